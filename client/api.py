"""`Client`: one object for both services. `encode` returns an EmbeddingBundle,
`generate` turns a bundle into images, and one method per mode does both."""
from __future__ import annotations

import io
import json
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from PIL import Image

from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc

from .images import image_bytes
from .modes import ROLE_INPUT, ROLE_REFERENCE, Focus, Mode, focus_role, resolve_parameters
from .wire import MAX_MESSAGE_BYTES, mode_to_proto, params_from_proto, params_to_proto

ImageLike = "Image.Image | bytes | str | Path"
ProgressCallback = Callable[[pb.Progress], None]

_FORMATS = {"png": pb.PNG, "webp": pb.WEBP, "jpeg": pb.JPEG, "jpg": pb.JPEG, "raw": pb.RAW_RGB8}


class ServiceError(RuntimeError):
    """A call to one of the two services failed; `service` says which, `code` how."""

    def __init__(self, service: str, code: grpc.StatusCode, details: str):
        super().__init__(f"{service}: {code.name}: {details}")
        self.service, self.code, self.details = service, code, details


@dataclass
class GenerationResult:
    images: list[Image.Image]
    data: list[bytes]                       # the encoded files as the generator sent them
    seed: int
    parameters: dict                        # effective parameters, defaults filled in
    ignored_parameters: list[str]
    request_id: str
    timings: dict = field(default_factory=dict)
    format: str = "png"


def _focus(value) -> Focus | None:
    if value is None or isinstance(value, Focus):
        return value
    return Focus(*value)


class Client:
    def __init__(self, encoder: str = "127.0.0.1:50051", generator: str = "127.0.0.1:50052",
                 timeout: float = 600.0, max_message_bytes: int = MAX_MESSAGE_BYTES):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        self.timeout = timeout
        self._channels = [grpc.insecure_channel(encoder, options), grpc.insecure_channel(generator, options)]
        self._encoder = pb_grpc.EncoderStub(self._channels[0])
        self._generator = pb_grpc.GeneratorStub(self._channels[1])
        self.addresses = {"encoder": encoder, "generator": generator}

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, service: str, method, request, **kwargs):
        try:
            return method(request, timeout=kwargs.pop("timeout", self.timeout),
                          metadata=(("x-request-id", request.request_id),), **kwargs)
        except grpc.RpcError as e:
            raise ServiceError(f"{service} at {self.addresses[service]}", e.code(), e.details()) from None

    # ------------------------------------------------------------ the two halves

    def info(self) -> dict[str, pb.ServerInfo]:
        rid = uuid.uuid4().hex
        return {"encoder": self._call("encoder", self._encoder.GetInfo, pb.GetInfoRequest(request_id=rid)),
                "generator": self._call("generator", self._generator.GetInfo, pb.GetInfoRequest(request_id=rid))}

    def encode(self, image: ImageLike, reference: ImageLike | None = None, prompt: str = "",
               focus: Focus | tuple | None = None, mode: Mode | str = Mode.VARIATION,
               pixel_budget: int | None = None, pad_to: int | None = None,
               request_id: str | None = None) -> pb.EmbeddingBundle:
        """Encode image a (and reference b); the focus goes with the image the mode applies it to."""
        mode, focus = Mode.parse(mode), _focus(focus)
        target = focus_role(mode)
        request = pb.EncodeRequest(request_id=request_id or uuid.uuid4().hex, prompt=prompt)
        for role, item in ((ROLE_INPUT, image), (ROLE_REFERENCE, reference)):
            if item is None:
                continue
            entry = request.images.add(role=role, image=pb.ImageData(data=image_bytes(item)))
            if focus is not None and role == target:
                entry.focus.CopyFrom(pb.Focus(center_x=focus.center_x, center_y=focus.center_y,
                                              radius=focus.radius))
        if pixel_budget is not None:
            request.pixel_budget = pixel_budget
        if pad_to is not None:
            request.pad_to = pad_to
        return self._call("encoder", self._encoder.Encode, request).bundle

    def generate(self, bundle: pb.EmbeddingBundle, mode: Mode | str = Mode.VARIATION,
                 image: ImageLike | None = None, mask: ImageLike | None = None,
                 progress: ProgressCallback | None = None, output_format: str = "png",
                 request_id: str | None = None, timeout: float | None = None, **params) -> GenerationResult:
        """Run one generation; `params` are GenerationParams fields (seed, steps, guidance, ...).
        A seed is chosen here when none is given, so the result always says which one ran."""
        mode = Mode.parse(mode)
        if params.get("seed") is None:
            params["seed"] = secrets.randbelow(2**32)
        resolve_parameters(mode, params)  # fail fast, before any bytes travel; the server checks again
        request = pb.GenerateRequest(request_id=request_id or uuid.uuid4().hex, mode=mode_to_proto(mode),
                                     bundle=bundle, params=params_to_proto(params),
                                     output=pb.OutputOptions(format=_FORMATS[output_format.lower()]))
        if image is not None:
            request.init_image.data = image_bytes(image)
        if mask is not None:
            request.mask.data = image_bytes(mask)
        images, data, summary = [], [], None
        stream = self._call("generator", self._generator.Generate, request, timeout=timeout or self.timeout)
        try:
            for event in stream:
                kind = event.WhichOneof("event")
                if kind == "progress" and progress is not None:
                    progress(event.progress)
                elif kind == "image":
                    data.append(event.image.data)
                    images.append(_decode_output(event.image))
                elif kind == "summary":
                    summary = event.summary
        except grpc.RpcError as e:
            raise ServiceError(f"generator at {self.addresses['generator']}", e.code(), e.details()) from None
        if summary is None:
            raise ServiceError(f"generator at {self.addresses['generator']}", grpc.StatusCode.DATA_LOSS,
                               "the stream ended without a summary")
        effective = params_from_proto(summary.effective)
        timings = {f.name: v for f, v in summary.timings.ListFields()}
        return GenerationResult(images, data, int(effective["seed"]), effective,
                                list(summary.ignored_parameters), summary.request_id, timings,
                                output_format.lower())

    # ------------------------------------------------------------ one call per mode

    def _run(self, mode: Mode, image, reference, prompt, focus, progress, init_image, mask, params):
        bundle = self.encode(image, reference=reference, prompt=prompt, focus=focus, mode=mode)
        return self.generate(bundle, mode=mode, image=init_image, mask=mask, progress=progress, **params)

    def variation(self, image: ImageLike, prompt: str = "", focus=None, progress=None, **params):
        return self._run(Mode.VARIATION, image, None, prompt, focus, progress, None, None, params)

    def img2img(self, image: ImageLike, reference: ImageLike | None = None, prompt: str = "", focus=None,
                progress=None, **params):
        return self._run(Mode.IMG2IMG, image, reference, prompt, focus, progress, image, None, params)

    def inpaint(self, image: ImageLike, mask: ImageLike, reference: ImageLike | None = None, prompt: str = "",
                focus=None, progress=None, **params):
        return self._run(Mode.INPAINT, image, reference, prompt, focus, progress, image, mask, params)

    def controlnet(self, image: ImageLike, reference: ImageLike | None = None, prompt: str = "", focus=None,
                   progress=None, **params):
        return self._run(Mode.CONTROLNET, image, reference, prompt, focus, progress, image, None, params)

    def controlnet_inpaint(self, image: ImageLike, mask: ImageLike, reference: ImageLike | None = None,
                           prompt: str = "", focus=None, progress=None, **params):
        return self._run(Mode.CONTROLNET_INPAINT, image, reference, prompt, focus, progress, image, mask, params)


def _decode_output(message: pb.GeneratedImage) -> Image.Image:
    if message.format == pb.RAW_RGB8:
        return Image.frombytes("RGB", (message.width, message.height), message.data)
    image = Image.open(io.BytesIO(message.data))
    image.load()
    return image


def png_metadata(image: Image.Image) -> dict:
    """The effective parameters, seed and versions the generator wrote into a PNG."""
    return json.loads(image.info["qwen2vl-flux"])
