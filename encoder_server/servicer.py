"""Thin gRPC servicer over Qwen2VLFluxEncoder: decode and check inputs, run the
model on its thread, pad the outputs into an EmbeddingBundle."""
from __future__ import annotations

import asyncio
import time

from qwen2vl_flux.client.errors import InvalidArgument
from qwen2vl_flux.client.images import DEFAULT_MAX_PIXELS, decode_image, image_bytes, resize_for_generation
from qwen2vl_flux.client.modes import ROLE_INPUT, ROLE_REFERENCE, Focus
from qwen2vl_flux.client.wire import bucket, pad_tokens
from qwen2vl_flux.serving.server import ModelHost, rpc_method, versions
from qwen2vl_flux.serving.tensors import to_wire
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc

from .model import Encoding

# Qwen2-VL needs at least 4 patches of 28x28; beyond 16384 tokens an image is
# far outside what the model was trained on and costs minutes.
MIN_PIXEL_BUDGET = 4 * 28 * 28
MAX_PIXEL_BUDGET = 16384 * 28 * 28
MAX_PAD_TO = 65536
CONTROL_KINDS = {pb.DEPTH: "depth", pb.LINE: "line"}
KIND_VALUES = {v: k for k, v in CONTROL_KINDS.items()}
LINE_DETECTORS = {pb.LINE_DETECTOR_UNSPECIFIED: "auto", pb.AUTO: "auto", pb.ANYLINE: "anyline", pb.CANNY: "canny"}


def bundle_message(encoding: Encoding, fingerprint: pb.ModelFingerprint, dtype: str,
                   pad_to: int | None) -> pb.EmbeddingBundle:
    images = []
    for e in encoding.images:
        n = e.tokens.shape[1]
        tokens = pad_tokens(pb.PaddedTensor(tensor=to_wire(e.tokens), valid_length=n),
                            pad_to if pad_to is not None else bucket(n))
        message = pb.ImageEmbedding(role=e.role, tokens=tokens, grid_t=e.grid_thw[0], grid_h=e.grid_thw[1],
                                    grid_w=e.grid_thw[2], pixel_budget=e.pixel_budget)
        if e.focus is not None:
            message.focus.CopyFrom(pb.Focus(center_x=e.focus.center_x, center_y=e.focus.center_y,
                                            radius=e.focus.radius))
        images.append(message)
    bundle = pb.EmbeddingBundle(fingerprint=fingerprint, images=images, pooled=to_wire(encoding.pooled),
                                dtype=dtype)
    if encoding.prompt is not None:
        bundle.prompt.CopyFrom(pb.PaddedTensor(tensor=to_wire(encoding.prompt),
                                               valid_length=encoding.prompt.shape[1]))
    return bundle


def _inputs(request: pb.EncodeRequest, max_pixels: int):
    if not request.images:
        raise InvalidArgument("images", "no image to encode: send image a (and optionally reference b)")
    if len(request.images) > 2:
        raise InvalidArgument("images", f"at most 2 images (a and reference b), got {len(request.images)}")
    inputs, roles = [], set()
    for i, item in enumerate(request.images):
        role = item.role or (ROLE_INPUT, ROLE_REFERENCE)[i]
        if role not in (ROLE_INPUT, ROLE_REFERENCE) or role in roles:
            raise InvalidArgument("images", f"images[{i}].role must be 'a' or 'b', each once; got {role!r}")
        roles.add(role)
        focus = None
        if item.HasField("focus"):
            focus = Focus(item.focus.center_x, item.focus.center_y, item.focus.radius)
        inputs.append((role, decode_image(item.image.data, f"images[{i}]", max_pixels), focus))
    return inputs


class EncoderServicer(pb_grpc.EncoderServicer):
    def __init__(self, host: ModelHost, args):
        self.host = host
        self.args = args
        self.max_pixels = DEFAULT_MAX_PIXELS

    @rpc_method
    async def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        model = self.host.require()
        budget = request.pixel_budget if request.HasField("pixel_budget") else None
        if budget is not None and not MIN_PIXEL_BUDGET <= budget <= MAX_PIXEL_BUDGET:
            raise InvalidArgument("pixel_budget", f"pixel_budget must be in {MIN_PIXEL_BUDGET}..{MAX_PIXEL_BUDGET}, "
                                                  f"got {budget}")
        pad_to = request.pad_to if request.HasField("pad_to") else None
        if pad_to is not None and not 1 <= pad_to <= MAX_PAD_TO:
            raise InvalidArgument("pad_to", f"pad_to must be in 1..{MAX_PAD_TO}, got {pad_to}")
        inputs = await asyncio.to_thread(_inputs, request, self.max_pixels)
        start = time.perf_counter()
        encoding = await self.host.run(model.encode, inputs, request.prompt, budget)
        seconds = time.perf_counter() - start
        longest = max(e.tokens.shape[1] for e in encoding.images)
        if pad_to is not None and pad_to < longest:
            raise InvalidArgument("pad_to", f"pad_to={pad_to} is shorter than the {longest} image tokens produced")
        bundle = bundle_message(encoding, model.fingerprint, str(model.dtype).removeprefix("torch."), pad_to)
        return pb.EncodeResponse(request_id=request.request_id, bundle=bundle, encode_seconds=seconds)

    @rpc_method
    async def ComputeControlMaps(self, request: pb.ControlMapsRequest, context) -> pb.ControlMapsResponse:
        model = self.host.require()
        kinds = [CONTROL_KINDS.get(k) for k in request.kinds] or ["depth", "line"]
        if None in kinds:
            raise InvalidArgument("kinds", f"unknown control map kind in {list(request.kinds)}")
        detector = LINE_DETECTORS.get(request.line_detector)
        if detector is None:
            raise InvalidArgument("line_detector", f"unknown line detector {request.line_detector}")
        radius = request.denoise_radius if request.HasField("denoise_radius") else None
        if radius is not None and not 0 <= radius <= 100:
            raise InvalidArgument("denoise_radius", f"denoise_radius must be in 0..100 pixels, got {radius}")
        image = await asyncio.to_thread(decode_image, request.image.data, "image", self.max_pixels)
        if request.resize_like_generator:
            image = resize_for_generation(image)
        maps = await self.host.run(model.control_maps, image, kinds, detector, radius)
        encoded = await asyncio.to_thread(lambda: [(kind, image_bytes(m), used) for kind, m, used in maps])
        return pb.ControlMapsResponse(request_id=request.request_id, maps=[
            pb.ControlMap(kind=KIND_VALUES[kind], image=pb.ImageData(data=data), detector=used)
            for kind, data, used in encoded])

    @rpc_method
    async def GetInfo(self, request, context) -> pb.ServerInfo:
        model = self.host.require()
        return pb.ServerInfo(
            role="encoder", fingerprint=model.fingerprint, dtype=str(model.dtype).removeprefix("torch."),
            device=str(model.device), versions=pb.Versions(**versions()), checkpoints=str(model.layout.root),
            limits=pb.Limits(max_message_bytes=self.args.max_message_bytes, max_image_pixels=self.max_pixels),
            components=["qwen2-vl", "connector", "t5", "t5_embedder", "clip (pooled of \"\")"],
            line_detectors=model.control.line_detectors())
