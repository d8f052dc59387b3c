"""`Client`: one object for both services. `encode` returns an EmbeddingBundle,
`generate` turns a bundle into images, and one method per mode does both."""
from __future__ import annotations

import io
import json
import secrets
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
from PIL import Image

from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc

from .errors import InvalidArgument
from .channels import ENCODER_SERVICE, GENERATOR_SERVICE, TLSFiles, open_channel
from .images import image_bytes
from .modes import (ROLE_INPUT, ROLE_REFERENCE, Focus, Mode, check_prompt, check_request_id, control_maps_used,
                    embedding_roles, focus_role, resolve_parameters)
from .wire import MAX_MESSAGE_BYTES, mode_to_proto, params_from_proto, params_to_proto

ImageLike = "Image.Image | bytes | str | Path"
ProgressCallback = Callable[[pb.Progress], None]

_CONTROL_KINDS = {"depth": pb.DEPTH, "line": pb.LINE}
_LINE_DETECTORS = {"auto": pb.AUTO, "anyline": pb.ANYLINE, "canny": pb.CANNY}
_FORMATS = {"png": pb.PNG, "webp": pb.WEBP, "jpeg": pb.JPEG, "jpg": pb.JPEG, "raw": pb.RAW_RGB8}


class ServiceError(RuntimeError):
    """A call to one of the two services failed; `service` says which, `code` how."""

    def __init__(self, service: str, code: grpc.StatusCode, details: str):
        super().__init__(f"{service}: {code.name}: {details}")
        self.service, self.code, self.details = service, code, details


class GeneratedImages(Sequence):
    """The generated images, read-only, each decoded on first access: a caller that only keeps
    the files (`GenerationResult.data`: writes them, forwards them) pays no PNG decode, about
    30 ms a megapixel. `sizes` needs no decode either; `list(result.images)` gives a list. A file
    Pillow cannot read raises when that image is first read."""

    def __init__(self, data: list[bytes]):
        self._data = data                                   # GenerationResult.data, shared
        self._kinds: list[tuple[int, int, int]] = []        # (format, width, height) per image
        self._decoded: dict[int, Image.Image] = {}
        self._lock = threading.Lock()

    def _add(self, message: pb.GeneratedImage) -> None:
        self._data.append(message.data)
        self._kinds.append((message.format, message.width, message.height))

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [(width, height) for _, width, height in self._kinds]

    def __len__(self) -> int:
        return len(self._kinds)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]
        with self._lock:
            if index not in self._decoded:
                fmt, width, height = self._kinds[index]
                self._decoded[index] = _decode_output(fmt, width, height, self._data[index])
            return self._decoded[index]

    def __eq__(self, other) -> bool:
        if isinstance(other, (GeneratedImages, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"GeneratedImages(sizes={self.sizes})"


@dataclass
class GenerationResult:
    images: GeneratedImages
    data: list[bytes]                       # the encoded files as the generator sent them
    seed: int
    parameters: dict                        # effective parameters, defaults filled in
    ignored_parameters: list[str]
    request_id: str
    timings: dict = field(default_factory=dict)
    format: str = "png"
    notes: list[str] = field(default_factory=list)   # what the client decided for the caller, and why


@dataclass
class ControlMaps:
    maps: dict[str, Image.Image]            # kind ("depth", "line") -> map
    detectors: dict[str, str]               # kind -> what made it ("anyline", "canny", ...)


def _request_id(given: str | None) -> str:
    if given:
        check_request_id(given)
    return given or uuid.uuid4().hex


def _focus(value) -> Focus | None:
    if value is None or isinstance(value, Focus):
        return value
    return Focus(*value)


class _Services:
    """The connection to both halves that Client and AsyncClient share: channels (grpc.aio
    ones when `aio`), stubs, bearer metadata and the call settings."""

    aio = False

    def __init__(self, encoder: "str | list[str]" = "127.0.0.1:50051",
                 generator: "str | list[str]" = "127.0.0.1:50052", timeout: float = 600.0,
                 token: str | None = None, tls: TLSFiles | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 retry_generation: bool = False, max_message_bytes: int = MAX_MESSAGE_BYTES):
        if tls is None and (tls_ca or tls_cert or tls_key):
            tls = TLSFiles(tls_ca, tls_cert, tls_key)
        self.timeout = timeout
        self.retry_generation = retry_generation
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._channels = [open_channel(encoder, ENCODER_SERVICE, tls, max_message_bytes, aio=self.aio),
                          open_channel(generator, GENERATOR_SERVICE, tls, max_message_bytes, aio=self.aio)]
        self._encoder = pb_grpc.EncoderStub(self._channels[0])
        self._generator = pb_grpc.GeneratorStub(self._channels[1])
        self.addresses = {"encoder": encoder, "generator": generator}
        self._encoder_info: pb.ServerInfo | None = None


class Client(_Services):
    """Both halves behind one object. `encoder` / `generator`: "host:port", several
    ("10.0.0.1:50052,10.0.0.2:50052" or a list) or a gRPC target ("dns:///svc:50052");
    calls spread over replicas round-robin. `token` is sent as a bearer token; `tls`
    (or tls_ca / tls_cert / tls_key) switches to TLS or mutual TLS. Every call has a
    deadline (`timeout` seconds). `retry_generation` re-runs a generation that failed
    with UNAVAILABLE before any image arrived (same request and seed, so the same
    images) on another replica; off by default, since a generation is not free."""


    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _error(self, service: str, error: grpc.RpcError) -> ServiceError:
        return service_error(service, self.addresses[service], error)

    def _call(self, service: str, method, request, timeout: float | None = None):
        try:
            return method(request, timeout=timeout or self.timeout,
                          metadata=(("x-request-id", request.request_id),) + self._metadata)
        except grpc.RpcError as e:
            raise self._error(service, e) from None

    # ------------------------------------------------------------ the two halves

    def info(self) -> dict[str, pb.ServerInfo]:
        rid = uuid.uuid4().hex
        return {"encoder": self._call("encoder", self._encoder.GetInfo, pb.GetInfoRequest(request_id=rid)),
                "generator": self._call("generator", self._generator.GetInfo, pb.GetInfoRequest(request_id=rid))}

    def encode(self, image: ImageLike, reference: ImageLike | None = None, prompt: str = "",
               focus: Focus | tuple | None = None, mode: Mode | str = Mode.VARIATION,
               pixel_budget: int | None = None, pad_to: int | None = None,
               request_id: str | None = None) -> pb.EmbeddingBundle:
        """Embed what the mode reads of image a and reference b; the focus goes with the
        image the mode applies it to (a in variation, b otherwise)."""
        request = encode_request(image, reference, prompt, focus, mode, pixel_budget, pad_to, request_id)
        return self._call("encoder", self._encoder.Encode, request).bundle

    def generate(self, bundle: pb.EmbeddingBundle, mode: Mode | str = Mode.VARIATION,
                 image: ImageLike | None = None, mask: ImageLike | None = None,
                 control_maps: dict[str, ImageLike] | None = None, mask_from_alpha: bool = False,
                 progress: ProgressCallback | None = None, output_format: str = "png",
                 request_id: str | None = None, timeout: float | None = None,
                 cancel_event: threading.Event | None = None, preview_every: int = 0,
                 **params) -> GenerationResult:
        """Run one generation; `params` are GenerationParams fields (seed, steps, guidance, ...).
        A seed is chosen here when none is given, so the result always says which one ran.
        Setting `cancel_event` cancels the call; the server stops within one step.
        `preview_every=N` adds a small JPEG preview (`progress.preview.data`) every N steps."""
        request = generate_request(bundle, mode, image, mask, control_maps, mask_from_alpha, output_format,
                                   request_id, preview_every, params)
        attempts = 2 if self.retry_generation else 1
        for attempt in range(attempts):
            events = GenerationEvents()
            try:
                stream = self._generator.Generate(request, timeout=timeout or self.timeout,
                                                  metadata=(("x-request-id", request.request_id),) + self._metadata)
                if cancel_event is not None:
                    _cancel_when_set(stream, cancel_event)
                for event in stream:
                    step = events.add(event)
                    if step is not None and progress is not None:
                        progress(step)
                break
            except grpc.RpcError as e:
                if not events.replayable(status_of(e), attempt + 1 < attempts):
                    raise self._error("generator", e) from None
        return events.result(f"generator at {self.addresses['generator']}", output_format)

    def control_maps(self, image: ImageLike, kinds=("depth", "line"), line_detector: str = "auto",
                     denoise_radius: float | None = None, resize_like_generator: bool = True,
                     request_id: str | None = None) -> ControlMaps:
        """Depth and line maps of image a, computed on the encoder's GPU. By default the
        image is first resized as the generator will resize it, so the maps match."""
        request = control_maps_request(image, kinds, line_detector, denoise_radius, resize_like_generator,
                                       request_id)
        return control_maps_from_proto(self._call("encoder", self._encoder.ComputeControlMaps, request))

    # ------------------------------------------------------------ one call per mode

    def _run(self, mode: Mode, image, reference, prompt, focus, progress, mask, params, control_maps=None,
             line_detector="auto", mask_from_alpha=False):
        options = {k: params.pop(k) for k in ("output_format", "request_id", "timeout", "cancel_event",
                                              "preview_every") if k in params}
        bundle = self.encode(image, reference=reference, prompt=prompt, focus=focus, mode=mode,
                             request_id=options.get("request_id"))
        notes = []
        if mode.uses_controlnet and control_maps is None:
            kinds, notes = control_kinds(mode, params, self.encoder_makes_depth, self.addresses["encoder"])
            control_maps = self.control_maps(image, kinds, line_detector=line_detector).maps
        result = self.generate(bundle, mode=mode, image=None if mode is Mode.VARIATION else image, mask=mask,
                               control_maps=control_maps, mask_from_alpha=mask_from_alpha, progress=progress,
                               **options, **params)
        result.notes.extend(notes)
        return result

    def encoder_makes_depth(self) -> bool:
        """Whether the encoder has a depth model (GetInfo, asked once per client)."""
        if self._encoder_info is None:
            self._encoder_info = self._call("encoder", self._encoder.GetInfo,
                                            pb.GetInfoRequest(request_id=uuid.uuid4().hex))
        return self._encoder_info.depth_available

    def variation(self, image: ImageLike, prompt: str = "", focus=None, progress=None, **params):
        return self._run(Mode.VARIATION, image, None, prompt, focus, progress, None, params)

    def img2img(self, image: ImageLike, reference: ImageLike | None = None, prompt: str = "", focus=None,
                progress=None, **params):
        return self._run(Mode.IMG2IMG, image, reference, prompt, focus, progress, None, params)

    def inpaint(self, image: ImageLike, mask: ImageLike | None = None, reference: ImageLike | None = None,
                prompt: str = "", focus=None, progress=None, mask_from_alpha: bool = False, **params):
        return self._run(Mode.INPAINT, image, reference, prompt, focus, progress, mask, params,
                         mask_from_alpha=mask_from_alpha)

    def controlnet(self, image: ImageLike, reference: ImageLike | None = None, prompt: str = "", focus=None,
                   progress=None, control_maps: dict | None = None, line_detector: str = "auto", **params):
        """`control_maps` ({"depth": img, "line": img}) skips the encoder's map computation."""
        return self._run(Mode.CONTROLNET, image, reference, prompt, focus, progress, None, params,
                         control_maps, line_detector)

    def controlnet_inpaint(self, image: ImageLike, mask: ImageLike | None = None,
                           reference: ImageLike | None = None, prompt: str = "", focus=None, progress=None,
                           control_maps: dict | None = None, line_detector: str = "auto",
                           mask_from_alpha: bool = False, **params):
        return self._run(Mode.CONTROLNET_INPAINT, image, reference, prompt, focus, progress, mask, params,
                         control_maps, line_detector, mask_from_alpha)

    def run(self, mode: Mode | str, image: ImageLike, **kwargs) -> GenerationResult:
        """Any mode by name (CLI and UIs)."""
        method = {Mode.VARIATION: self.variation, Mode.IMG2IMG: self.img2img, Mode.INPAINT: self.inpaint,
                  Mode.CONTROLNET: self.controlnet, Mode.CONTROLNET_INPAINT: self.controlnet_inpaint}
        return method[Mode.parse(mode)](image, **kwargs)


# ------------------------------------------------------------ shared by Client and AsyncClient

def encode_request(image: ImageLike, reference: ImageLike | None = None, prompt: str = "",
                   focus: Focus | tuple | None = None, mode: Mode | str = Mode.VARIATION,
                   pixel_budget: int | None = None, pad_to: int | None = None,
                   request_id: str | None = None) -> pb.EncodeRequest:
    mode, focus = Mode.parse(mode), _focus(focus)
    check_prompt(prompt)
    target = focus_role(mode)
    request = pb.EncodeRequest(request_id=_request_id(request_id), prompt=prompt)
    inputs = {ROLE_INPUT: image, ROLE_REFERENCE: reference}
    for role in embedding_roles(mode, reference is not None):
        item = inputs[role]
        entry = request.images.add(role=role, image=pb.ImageData(data=image_bytes(item)))
        if focus is not None and role == target:
            entry.focus.CopyFrom(pb.Focus(center_x=focus.center_x, center_y=focus.center_y,
                                          radius=focus.radius))
    if pixel_budget is not None:
        request.pixel_budget = pixel_budget
    if pad_to is not None:
        request.pad_to = pad_to
    return request


def generate_request(bundle: pb.EmbeddingBundle, mode: Mode | str, image, mask, control_maps,
                     mask_from_alpha: bool, output_format: str, request_id: str | None, preview_every: int,
                     params: dict) -> pb.GenerateRequest:
    """Checks `params` (and picks a seed when none is given) before any bytes travel."""
    mode = Mode.parse(mode)
    if params.get("seed") is None:
        params["seed"] = secrets.randbelow(2**32)
    resolve_parameters(mode, params)  # fail fast; the server checks again
    if output_format.lower() not in _FORMATS:
        raise InvalidArgument("output_format", f"output_format must be one of {', '.join(_FORMATS)}, "
                                               f"got {output_format!r}")
    request = pb.GenerateRequest(request_id=_request_id(request_id), mode=mode_to_proto(mode),
                                 bundle=bundle, params=params_to_proto(params),
                                 output=pb.OutputOptions(format=_FORMATS[output_format.lower()],
                                                         preview_every=preview_every))
    if image is not None:
        request.init_image.data = image_bytes(image)
    if mask is not None:
        request.mask.data = image_bytes(mask)
    request.mask_from_alpha = mask_from_alpha
    for kind, picture in (control_maps or {}).items():
        request.control_maps.add(kind=_CONTROL_KINDS[kind], image=pb.ImageData(data=image_bytes(picture)))
    return request


def control_maps_request(image: ImageLike, kinds, line_detector: str, denoise_radius: float | None,
                         resize_like_generator: bool, request_id: str | None) -> pb.ControlMapsRequest:
    if line_detector not in _LINE_DETECTORS:
        raise InvalidArgument("line_detector", f"line_detector must be one of {', '.join(_LINE_DETECTORS)}, "
                                               f"got {line_detector!r}")
    request = pb.ControlMapsRequest(request_id=_request_id(request_id),
                                    image=pb.ImageData(data=image_bytes(image)),
                                    kinds=[_CONTROL_KINDS[k] for k in kinds],
                                    line_detector=_LINE_DETECTORS[line_detector],
                                    resize_like_generator=resize_like_generator)
    if denoise_radius is not None:
        request.denoise_radius = denoise_radius
    return request


def control_maps_from_proto(response: pb.ControlMapsResponse) -> ControlMaps:
    names = {v: k for k, v in _CONTROL_KINDS.items()}
    maps, detectors = {}, {}
    for item in response.maps:
        maps[names[item.kind]] = _open_image(item.image.data)
        detectors[names[item.kind]] = item.detector
    return ControlMaps(maps, detectors)


def control_kinds(mode: Mode, params: dict, makes_depth: Callable[[], bool],
                  encoder: str) -> tuple[list[str], list[str]]:
    """The control maps a ControlNet request needs the encoder to compute, and notes for the
    caller. When depth is only a default and the encoder has no depth model, the line map
    alone is used (`params` updated) and a note says so."""
    effective, _ = resolve_parameters(mode, dict(params, seed=params.get("seed") or 0))
    kinds = [kind for kind, _, _ in control_maps_used(effective)]
    if "depth" in kinds and params.get("depth") is None and params.get("line") is not False and not makes_depth():
        params.update(depth=False, line=True)
        return ["line"], [f"the encoder at {encoder} has no depth model: the line map only (depth=False); "
                          "send a depth map to use one"]
    return kinds, []


class GenerationEvents:
    """The events of one Generate stream, gathered into a GenerationResult."""

    def __init__(self):
        self.data, self.summary = [], None
        self.images = GeneratedImages(self.data)

    def add(self, event: pb.GenerateEvent) -> pb.Progress | None:
        """Keep an image or the summary; hand back a progress event."""
        kind = event.WhichOneof("event")
        if kind == "progress":
            return event.progress
        if kind == "image":
            self.images._add(event.image)
        elif kind == "summary":
            self.summary = event.summary
        return None

    def replayable(self, code: grpc.StatusCode, attempts_left: bool) -> bool:
        """A generation is re-run only when asked, on UNAVAILABLE, before any image arrived."""
        return code == grpc.StatusCode.UNAVAILABLE and not self.images and attempts_left

    def result(self, service: str, output_format: str) -> GenerationResult:
        summary = self.summary
        if summary is None:
            raise ServiceError(service, grpc.StatusCode.DATA_LOSS, "the stream ended without a summary")
        effective = params_from_proto(summary.effective)
        timings = {f.name: v for f, v in summary.timings.ListFields()}
        return GenerationResult(self.images, self.data, int(effective["seed"]), effective,
                                list(summary.ignored_parameters), summary.request_id, timings,
                                output_format.lower())


def service_error(service: str, address, error: grpc.RpcError) -> ServiceError:
    """The error a caller sees, with what to do when nothing answers at `address`."""
    code, details = status_of(error), error.details() or ""
    if code != error.code():
        details = f"the server ended the call ({details or 'cancelled'}): it is stopping or restarting; retry"
    elif code == grpc.StatusCode.UNAVAILABLE and _no_connection(details):
        details += f"; {unavailable_hint(service, address)}"
    return ServiceError(f"{service} at {address}", code, details)


def status_of(error: grpc.RpcError) -> grpc.StatusCode:
    """The call's status as the caller should read it: CANCELLED that this process did not ask
    for (a server shutting down cancels what it has not finished) is UNAVAILABLE, so it is
    retried like any other unavailable server."""
    code = error.code()
    if code == grpc.StatusCode.CANCELLED and "locally cancelled" not in (error.details() or "").lower():
        return grpc.StatusCode.UNAVAILABLE
    return code


def _no_connection(details: str) -> bool:
    """gRPC's own words for "nothing listens there" (our servers' UNAVAILABLE say loading or draining)."""
    text = details.lower()
    return "connect" in text or "backends failing" in text or "dns resolution failed" in text


def unavailable_hint(service: str, address) -> str:
    """What to do when nothing answers at `address`."""
    text = address if isinstance(address, str) else ",".join(address)
    port = text.rsplit(":", 1)[-1] if ":" in text else "PORT"
    return (f"is the {service} running at {text}? start both servers with `qwen2vl-flux serve` (the demo model), "
            f"or this one with `qwen2vl-flux-{service} --checkpoints DIR --port {port}`")


def _cancel_when_set(call: grpc.Future, event: threading.Event) -> None:
    """Cancel `call` once `event` is set, for as long as the call runs."""

    def watch():
        while call.running():
            if event.wait(0.05):
                call.cancel()
                return

    threading.Thread(target=watch, daemon=True, name="cancel-watch").start()


def _open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _decode_output(fmt: int, width: int, height: int, data: bytes) -> Image.Image:
    if fmt == pb.RAW_RGB8:
        return Image.frombytes("RGB", (width, height), data)
    return _open_image(data)


def png_metadata(image: Image.Image) -> dict:
    """The effective parameters, seed and versions the generator wrote into a PNG."""
    return json.loads(image.info["qwen2vl-flux"])
