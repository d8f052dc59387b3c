"""Thin gRPC servicer over Qwen2VLFluxEncoder: decode and check inputs, run the
model on its thread, pad the outputs into an EmbeddingBundle."""
from __future__ import annotations

import asyncio
import time

from qwen2vl_flux.client.errors import InvalidArgument
from qwen2vl_flux.client.images import decode_image, image_bytes, resize_for_generation
from qwen2vl_flux.client.modes import (MAX_CONTROL_MAP_ASPECT_RATIO, MAX_PROMPT_BYTES, MIN_IMAGE_SIDE, ROLE_INPUT,
                                       ROLE_REFERENCE, Focus, check_aspect_ratio, check_prompt, generation_size,
                                       pixel_budget)
from qwen2vl_flux.client.wire import bucket, pad_tokens
from qwen2vl_flux.serving.server import Cancelled, ModelHost, log_event, request_id, rpc_method, server_info
from qwen2vl_flux.serving.tensors import to_wire
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc

from .cache import EncodingCache, image_key, prompt_key
from .model import ImageEncoding

# Qwen2-VL needs at least 4 patches of 28x28; beyond 16384 tokens an image is
# far outside what the model was trained on and costs minutes.
MIN_PIXEL_BUDGET = 4 * 28 * 28
MAX_PIXEL_BUDGET = 16384 * 28 * 28
MAX_PAD_TO = 65536
CONTROL_KINDS = {pb.DEPTH: "depth", pb.LINE: "line"}
KIND_VALUES = {v: k for k, v in CONTROL_KINDS.items()}
LINE_DETECTORS = {pb.LINE_DETECTOR_UNSPECIFIED: "auto", pb.AUTO: "auto", pb.ANYLINE: "anyline", pb.CANNY: "canny"}


def image_message(e: ImageEncoding) -> pb.ImageEmbedding:
    """One image's embedding, unpadded (padding is per request)."""
    message = pb.ImageEmbedding(role=e.role, grid_t=e.grid_thw[0], grid_h=e.grid_thw[1], grid_w=e.grid_thw[2],
                                pixel_budget=e.pixel_budget,
                                tokens=pb.PaddedTensor(tensor=to_wire(e.tokens), valid_length=e.tokens.shape[1]))
    if e.focus is not None:
        message.focus.CopyFrom(pb.Focus(center_x=e.focus.center_x, center_y=e.focus.center_y,
                                        radius=e.focus.radius))
    return message


def _inputs(request: pb.EncodeRequest) -> list[tuple[str, bytes, Focus | None]]:
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
        inputs.append((role, item.image.data, focus))
    return inputs


def _logged_stop(fn, message: str, rid: str):
    """`fn` for the model thread, logging where it stopped when its caller went away."""

    def work(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Cancelled as e:
            log_event(message, request_id=rid, detail=str(e))
            raise

    return work


class EncoderServicer(pb_grpc.EncoderServicer):
    def __init__(self, host: ModelHost, args):
        self.host = host
        self.args = args
        self.max_pixels = args.max_image_pixels
        self.cache = EncodingCache(args.cache_size)
        self._pooled = None

    @property
    def pooled(self) -> pb.Tensor:
        """CLIP pooled of "": a constant, serialised once."""
        if self._pooled is None:
            self._pooled = to_wire(self.host.require().pooled)
        return self._pooled

    @rpc_method
    async def Encode(self, request: pb.EncodeRequest, context) -> pb.EncodeResponse:
        model = self.host.require()
        check_prompt(request.prompt)   # before anything reads it: a 16 MB prompt costs minutes of tokenising
        budget = request.pixel_budget if request.HasField("pixel_budget") else pixel_budget(request.prompt)
        if not MIN_PIXEL_BUDGET <= budget <= MAX_PIXEL_BUDGET:
            raise InvalidArgument("pixel_budget", f"pixel_budget must be in {MIN_PIXEL_BUDGET}..{MAX_PIXEL_BUDGET}, "
                                                  f"got {budget}")
        pad_to = request.pad_to if request.HasField("pad_to") else None
        if pad_to is not None and not 1 <= pad_to <= MAX_PAD_TO:
            raise InvalidArgument("pad_to", f"pad_to must be in 1..{MAX_PAD_TO}, got {pad_to}")
        inputs = _inputs(request)
        prompt = request.prompt if request.prompt.strip() else None

        # Cached parts cost nothing; the rest is decoded, then encoded in one turn on the model.
        keys = {role: image_key(data, focus, budget, role) for role, data, focus in inputs}
        found = {role: self.cache.get(key) for role, key in keys.items()}
        prompt_message = self.cache.get(prompt_key(prompt)) if prompt else None
        missing = [(role, data, focus) for role, data, focus in inputs if found[role] is None]
        start = time.perf_counter()
        hit = not missing and (prompt is None or prompt_message is not None)
        if not hit:
            def decode():
                images = []
                for role, data, focus in missing:
                    image = decode_image(data, f"images[{role}]", self.max_pixels)
                    check_aspect_ratio(f"images[{role}]", *image.size)
                    images.append((role, image, focus))
                return images

            rid = request_id(request, context)
            async with self.host.turn("Encode", decode) as turn:
                encodings, prompt_tensor = await self.host.run(
                    _logged_stop(model.encode_parts, "encode stopped", rid), turn.prepared,
                    prompt if prompt_message is None else None, budget, cancelled=turn.stop.is_set)
            for encoding in encodings:
                found[encoding.role] = image_message(encoding)
                self.cache.put(keys[encoding.role], found[encoding.role])
            if prompt_tensor is not None:
                prompt_message = pb.PaddedTensor(tensor=to_wire(prompt_tensor), valid_length=prompt_tensor.shape[1])
                self.cache.put(prompt_key(prompt), prompt_message)
        self.host.metrics.cache.labels("hit" if hit else "miss").inc()

        longest = max(found[role].tokens.valid_length for role, _, _ in inputs)
        if pad_to is not None and pad_to < longest:
            raise InvalidArgument("pad_to", f"pad_to={pad_to} is shorter than the {longest} image tokens produced")
        bundle = pb.EmbeddingBundle(fingerprint=model.fingerprint, pooled=self.pooled,
                                    dtype=str(model.dtype).removeprefix("torch."))
        for role, _, _ in inputs:
            embedding = bundle.images.add()
            embedding.CopyFrom(found[role])
            embedding.tokens.CopyFrom(pad_tokens(found[role].tokens, pad_to or bucket(longest)))
        if prompt_message is not None:
            bundle.prompt.CopyFrom(prompt_message)
        return pb.EncodeResponse(request_id=request.request_id, bundle=bundle,
                                 encode_seconds=time.perf_counter() - start, cache_hit=hit)

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
        def decode():
            image = decode_image(request.image.data, "image", self.max_pixels)
            check_aspect_ratio("image", *image.size, limit=MAX_CONTROL_MAP_ASPECT_RATIO)
            if request.resize_like_generator:
                width, height = generation_size(*image.size, model.layout.native_size)
                if min(width, height) < MIN_IMAGE_SIDE:
                    raise InvalidArgument("image", f"image becomes {width}x{height} by the generator's resize rule; "
                                                   f"it needs at least {MIN_IMAGE_SIDE} pixels a side")
                image = resize_for_generation(image, model.layout.native_size)
            return image

        rid = request_id(request, context)
        async with self.host.turn("ComputeControlMaps", decode) as turn:
            maps = await self.host.run(_logged_stop(model.control_maps, "control maps stopped", rid), turn.prepared,
                                       kinds, detector, radius, cancelled=turn.stop.is_set)
        encoded = await asyncio.to_thread(lambda: [(kind, image_bytes(m), used) for kind, m, used in maps])
        return pb.ControlMapsResponse(request_id=request.request_id, maps=[
            pb.ControlMap(kind=KIND_VALUES[kind], image=pb.ImageData(data=data), detector=used)
            for kind, data, used in encoded])

    @rpc_method
    async def GetInfo(self, request, context) -> pb.ServerInfo:
        model = self.host.require()
        return server_info("encoder", model, self.args, line_detectors=model.control.line_detectors(),
                           depth_available=model.control.depth_available(),
                           limits={"max_prompt_bytes": MAX_PROMPT_BYTES},
                           components=["qwen2-vl", "connector", "t5", "t5_embedder", "clip (pooled of \"\")"])
