"""`AsyncClient`: the `Client` on grpc.aio, for asyncio programs (the HTTP gateway).

Same requests, rules, errors, replicas and TLS as the synchronous client (the request
builders and the result collection live in api.py); what differs is only how a call
waits. Cancelling the awaiting task cancels the gRPC call, and the generator stops
the job within one step.
"""
from __future__ import annotations

import inspect
import uuid

import grpc

from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb

from .api import (ControlMaps, GenerationEvents, GenerationResult, ImageLike, ServiceError, _Services,
                  control_kinds, control_maps_from_proto, control_maps_request, encode_request, generate_request,
                  service_error, status_of)
from .modes import Focus, Mode


class AsyncClient(_Services):
    """Both halves behind one object, for asyncio. Arguments as `Client`; use it as
    `async with AsyncClient(...) as client:` or call `await client.close()`."""

    aio = True

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    def _error(self, service: str, error: grpc.RpcError) -> ServiceError:
        return service_error(service, self.addresses[service], error)

    async def _call(self, service: str, method, request, timeout: float | None = None):
        try:
            return await method(request, timeout=timeout or self.timeout,
                                metadata=(("x-request-id", request.request_id),) + self._metadata)
        except grpc.RpcError as e:
            raise self._error(service, e) from None

    async def info(self, timeout: float | None = None) -> dict[str, pb.ServerInfo]:
        rid = uuid.uuid4().hex
        request = pb.GetInfoRequest(request_id=rid)
        return {"encoder": await self._call("encoder", self._encoder.GetInfo, request, timeout),
                "generator": await self._call("generator", self._generator.GetInfo, request, timeout)}

    async def encode(self, image: ImageLike, reference: ImageLike | None = None, prompt: str = "",
                     focus: Focus | tuple | None = None, mode: Mode | str = Mode.VARIATION,
                     pixel_budget: int | None = None, pad_to: int | None = None,
                     request_id: str | None = None) -> pb.EmbeddingBundle:
        request = encode_request(image, reference, prompt, focus, mode, pixel_budget, pad_to, request_id)
        return (await self._call("encoder", self._encoder.Encode, request)).bundle

    async def control_maps(self, image: ImageLike, kinds=("depth", "line"), line_detector: str = "auto",
                           denoise_radius: float | None = None, resize_like_generator: bool = True,
                           request_id: str | None = None) -> ControlMaps:
        request = control_maps_request(image, kinds, line_detector, denoise_radius, resize_like_generator,
                                       request_id)
        return control_maps_from_proto(await self._call("encoder", self._encoder.ComputeControlMaps, request))

    async def generate(self, bundle: pb.EmbeddingBundle, mode: Mode | str = Mode.VARIATION,
                       image: ImageLike | None = None, mask: ImageLike | None = None,
                       control_maps: dict[str, ImageLike] | None = None, mask_from_alpha: bool = False,
                       progress=None, output_format: str = "png", request_id: str | None = None,
                       timeout: float | None = None, preview_every: int = 0, **params) -> GenerationResult:
        """As `Client.generate`; `progress` may be a plain function or a coroutine function."""
        request = generate_request(bundle, mode, image, mask, control_maps, mask_from_alpha, output_format,
                                   request_id, preview_every, params)
        attempts = 2 if self.retry_generation else 1
        for attempt in range(attempts):
            events = GenerationEvents()
            call = self._generator.Generate(request, timeout=timeout or self.timeout,
                                            metadata=(("x-request-id", request.request_id),) + self._metadata)
            try:
                async for event in call:
                    step = events.add(event)
                    if step is not None and progress is not None:
                        returned = progress(step)
                        if inspect.isawaitable(returned):
                            await returned
                break
            except grpc.RpcError as e:
                if not events.replayable(status_of(e), attempt + 1 < attempts):
                    raise self._error("generator", e) from None
            finally:
                call.cancel()   # no-op once finished; stops the job when this task is cancelled
        return events.result(f"generator at {self.addresses['generator']}", output_format)

    async def run(self, mode: Mode | str, image: ImageLike, reference: ImageLike | None = None,
                  prompt: str = "", focus=None, progress=None, mask: ImageLike | None = None,
                  mask_from_alpha: bool = False, control_maps: dict | None = None, line_detector: str = "auto",
                  output_format: str = "png", request_id: str | None = None, timeout: float | None = None,
                  preview_every: int = 0, **params) -> GenerationResult:
        """Any mode by name: encode what it reads, compute the control maps it needs, generate."""
        mode = Mode.parse(mode)
        bundle = await self.encode(image, reference=reference if mode is not Mode.VARIATION else None,
                                   prompt=prompt, focus=focus, mode=mode, request_id=request_id)
        notes = []
        if mode.uses_controlnet and control_maps is None:
            if self._encoder_info is None:
                self._encoder_info = (await self.info())["encoder"]
            kinds, notes = control_kinds(mode, params, lambda: self._encoder_info.depth_available,
                                         self.addresses["encoder"])
            control_maps = (await self.control_maps(image, kinds, line_detector=line_detector,
                                                    request_id=request_id)).maps
        result = await self.generate(bundle, mode=mode, image=None if mode is Mode.VARIATION else image,
                                     mask=mask if mode.uses_mask else None, control_maps=control_maps,
                                     mask_from_alpha=mask_from_alpha, progress=progress, output_format=output_format,
                                     request_id=request_id, timeout=timeout, preview_every=preview_every, **params)
        result.notes.extend(notes)
        return result

    async def variation(self, image: ImageLike, **kwargs) -> GenerationResult:
        return await self.run(Mode.VARIATION, image, **kwargs)

    async def img2img(self, image: ImageLike, **kwargs) -> GenerationResult:
        return await self.run(Mode.IMG2IMG, image, **kwargs)

    async def inpaint(self, image: ImageLike, mask: ImageLike | None = None, **kwargs) -> GenerationResult:
        return await self.run(Mode.INPAINT, image, mask=mask, **kwargs)

    async def controlnet(self, image: ImageLike, **kwargs) -> GenerationResult:
        return await self.run(Mode.CONTROLNET, image, **kwargs)

    async def controlnet_inpaint(self, image: ImageLike, mask: ImageLike | None = None,
                                 **kwargs) -> GenerationResult:
        return await self.run(Mode.CONTROLNET_INPAINT, image, mask=mask, **kwargs)
