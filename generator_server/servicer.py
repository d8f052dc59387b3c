"""Thin gRPC servicer over FluxGenerator: check the bundle and parameters, run the
job on the model thread while streaming its progress, then stream the images."""
from __future__ import annotations

import asyncio
import io
import json
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from qwen2vl_flux.client.errors import InvalidArgument, ModelMismatch
from qwen2vl_flux.client.images import alpha_mask, decode_image, decode_mask, fit_mask, resize_for_generation
from qwen2vl_flux.client.modes import (MAX_CONTROL_MAPS, MAX_GUIDANCE, MAX_IMAGE_COUNT, MAX_OUTPUT_PIXELS,
                                       MAX_PIXEL_STEPS, MAX_SIDE, MAX_STEPS, MIN_IMAGE_SIDE, ROLE_INPUT, Mode,
                                       check_output_budget, control_maps_used, output_size, resolve_parameters,
                                       transformer_role)
from qwen2vl_flux.client.png import png_bytes
from qwen2vl_flux.client.wire import mode_from_proto, params_from_proto, params_to_proto
from qwen2vl_flux.serving.server import (Cancelled, ModelHost, log_event, request_id, rpc_method, rpc_stream,
                                         server_info, versions)
from qwen2vl_flux.serving.tensors import from_wire
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc

from .pipeline import Conditioning, FluxGenerator, GenerationJob

PNG_METADATA_KEY = "qwen2vl-flux"
CONTROL_KINDS = {pb.DEPTH: "depth", pb.LINE: "line"}


def _padded(message: pb.PaddedTensor, name: str, width: int, device, dtype) -> torch.Tensor:
    tensor = from_wire(message.tensor, name)
    if tensor.dim() != 3 or tensor.shape[0] != 1 or tensor.shape[2] != width:
        raise InvalidArgument(name, f"{name}: expected shape (1, N, {width}), got {list(tensor.shape)}")
    if not 0 < message.valid_length <= tensor.shape[1]:
        raise InvalidArgument(name, f"{name}: valid_length {message.valid_length} outside 1..{tensor.shape[1]}")
    # Trim the wire padding: the image must equal the unpadded one.
    return _finite(tensor[:, :message.valid_length], name).to(device, dtype)


def _finite(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise InvalidArgument(name, f"{name} holds NaN or infinite values; re-encode (an fp16 encoder overflowing?)")
    return tensor


def conditioning_from_bundle(bundle: pb.EmbeddingBundle, model: FluxGenerator, mode: Mode) -> Conditioning:
    mine, theirs = model.fingerprint, bundle.fingerprint
    if mine != theirs:
        raise ModelMismatch(
            "bundle was made by another model: encoder fingerprint "
            f"[{_describe(theirs)}], this generator [{_describe(mine)}]; point both servers at one checkpoint")
    fp, device, dtype = mine, model.device, model.dtype
    images = {}
    for i, item in enumerate(bundle.images):
        if item.role in images:
            raise InvalidArgument("bundle", f"bundle has two embeddings for image {item.role!r}")
        images[item.role] = _padded(item.tokens, f"bundle.images[{i}]", fp.joint_attention_dim, device, dtype)
    needed = {transformer_role(mode, set(images))} | ({ROLE_INPUT} if mode.uses_controlnet else set())
    missing = needed - set(images)
    if missing:
        raise InvalidArgument("bundle", f"mode {mode.value} needs the embedding of image "
                                        f"{', '.join(sorted(missing))}; encode it first")
    prompt = None
    if bundle.HasField("prompt"):
        prompt = _padded(bundle.prompt, "bundle.prompt", fp.inner_dim, device, dtype)
    pooled = from_wire(bundle.pooled, "bundle.pooled")
    if list(pooled.shape) != [1, fp.pooled_dim]:
        raise InvalidArgument("bundle.pooled", f"bundle.pooled: expected (1, {fp.pooled_dim}), "
                                               f"got {list(pooled.shape)}")
    return Conditioning(images, prompt, _finite(pooled, "bundle.pooled").to(device, dtype))


def _describe(fp: pb.ModelFingerprint) -> str:
    return (f"{fp.family} id={fp.checkpoint_id} qwen={fp.qwen_hidden_size} joint={fp.joint_attention_dim} "
            f"inner={fp.inner_dim} pooled={fp.pooled_dim}")


def output_settings(options: pb.OutputOptions) -> tuple[int, int, int]:
    """(format, PNG level, JPEG/WebP quality), checked before any GPU time is spent."""
    fmt = options.format or pb.PNG
    if fmt not in (pb.PNG, pb.JPEG, pb.WEBP, pb.RAW_RGB8):
        raise InvalidArgument("format", f"unknown output format {fmt}")
    # Level 1: zlib's fastest; level 6 takes about 5 x as long for a file 7 % smaller (BENCHMARKS.md).
    level = options.png_compress_level if options.HasField("png_compress_level") else 1
    if level > 9:
        raise InvalidArgument("png_compress_level", f"png_compress_level must be 0..9, got {level}")
    quality = options.quality if options.HasField("quality") else 95
    if not 1 <= quality <= 100:
        raise InvalidArgument("quality", f"quality must be 1..100, got {quality}")
    if options.preview_every > MAX_STEPS:
        raise InvalidArgument("preview_every", f"preview_every must be 0..{MAX_STEPS}, got {options.preview_every}")
    return fmt, level, quality


def encode_output(image: Image.Image, options: pb.OutputOptions, metadata: dict) -> tuple[int, bytes]:
    fmt, level, quality = output_settings(options)
    buf = io.BytesIO()
    text = json.dumps(metadata, sort_keys=True)
    if fmt == pb.PNG:
        buf.write(png_bytes(image, level, {PNG_METADATA_KEY: text}))
    elif fmt in (pb.JPEG, pb.WEBP):
        exif = Image.Exif()
        exif[0x010E] = text  # ImageDescription
        image.save(buf, format="JPEG" if fmt == pb.JPEG else "WEBP", quality=quality, exif=exif)
    else:
        buf.write(image.convert("RGB").tobytes())
    return fmt, buf.getvalue()


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(self, host: ModelHost, args):
        self.host = host
        self.args = args
        self.max_pixels = args.max_image_pixels
        # Output images are encoded on threads of their own (zlib and libwebp let go of the GIL),
        # so a request of many images does not hold up the uploads of the next one.
        self._encoding = ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)), thread_name_prefix="image-encode")

    def _checked(self, request: pb.GenerateRequest) -> tuple[Mode, dict, list[str]]:
        """What can be judged from the message alone, before admission (no decoding)."""
        output_settings(request.output)
        mode = mode_from_proto(request.mode)
        given = params_from_proto(request.params)
        if given.get("seed") is None:
            given["seed"] = secrets.randbelow(2**32)
        params, ignored = resolve_parameters(mode, given, max_pixels=MAX_OUTPUT_PIXELS)
        if mode.uses_init_image and not request.init_image.data:
            raise InvalidArgument("init_image", f"mode {mode.value} needs image a as init_image")
        if len(request.control_maps) > MAX_CONTROL_MAPS:
            raise InvalidArgument("control_maps", f"control_maps: {len(request.control_maps)} sent; at most "
                                                  f"{MAX_CONTROL_MAPS} (one depth, one line)")
        kinds = [item.kind for item in request.control_maps]
        for i, kind in enumerate(kinds):
            if kind not in CONTROL_KINDS:
                raise InvalidArgument("control_maps", f"control_maps[{i}]: unknown kind {kind}")
            if kinds.index(kind) != i:
                raise InvalidArgument("control_maps", f"control_maps[{i}]: a second {CONTROL_KINDS[kind]} map")
        return mode, params, ignored

    def _job(self, request: pb.GenerateRequest, model: FluxGenerator, mode: Mode, params: dict,
             ignored: list[str]) -> GenerationJob:
        conditioning = conditioning_from_bundle(request.bundle, model, mode)
        job = GenerationJob(mode, params, conditioning, ignored=ignored)
        if mode.uses_init_image:
            init = decode_image(request.init_image.data, "init_image", self.max_pixels)
            job.init_image = resize_for_generation(init, model.native_size)
            width, height = output_size(*job.init_image.size)
            if min(width, height) < MIN_IMAGE_SIDE:
                raise InvalidArgument("init_image", f"init_image becomes {job.init_image.size[0]}x"
                                                    f"{job.init_image.size[1]}; the generator needs at least "
                                                    f"{MIN_IMAGE_SIDE} pixels on each side")
            check_output_budget(width, height, params)
        if mode.uses_mask:
            job.mask = fit_mask(self._mask(request), init.size, model.native_size)
        if mode.uses_controlnet:
            job.control_maps = self._control_maps(request, params)
        return job

    def _mask(self, request: pb.GenerateRequest):
        if request.mask_from_alpha:
            return alpha_mask(request.init_image.data, "init_image", self.max_pixels)
        if not request.mask.data:
            raise InvalidArgument("mask", "inpaint modes need a mask (white = repaint), or mask_from_alpha")
        return decode_mask(request.mask.data, "mask", self.max_pixels)

    def _control_maps(self, request: pb.GenerateRequest, params: dict) -> dict:
        given = {CONTROL_KINDS[item.kind]: (i, item) for i, item in enumerate(request.control_maps)}
        maps = {}
        for kind, _, _ in control_maps_used(params):
            if kind not in given:
                raise InvalidArgument("control_maps", f"this request needs a {kind} map: send it in control_maps "
                                                      "(the client computes it with the encoder's ComputeControlMaps)")
            i, item = given[kind]
            maps[kind] = decode_image(item.image.data, f"control_maps[{i}]", self.max_pixels)
        return maps

    @rpc_stream
    async def Generate(self, request: pb.GenerateRequest, context):
        received = time.perf_counter()
        model = self.host.require()
        rid = request_id(request, context)
        mode, params, ignored = self._checked(request)
        # Admission first: uploads are decoded while the request waits for the model.
        async with self.host.turn("Generate", lambda: self._job(request, model, mode, params, ignored)) as turn:
            job = turn.prepared
            job.timings["queue"] = time.perf_counter() - received
            async for event in self._run_job(job, model, rid, request.output.preview_every, turn.stop):
                yield event
        images = job.images

        # Image encoding runs after the model is released: the next request's denoise overlaps it.
        # The images are encoded side by side and stream in order.
        start = time.perf_counter()
        metadata = {"mode": job.mode.value, "parameters": job.params, "versions": versions()}
        loop = asyncio.get_running_loop()
        encodings = [loop.run_in_executor(self._encoding, encode_output, image, request.output,
                                          dict(metadata, index=index))
                     for index, image in enumerate(images)]
        for encoding in encodings:   # retrieved even when an earlier image's failure ends the stream
            encoding.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            for index, (image, encoding) in enumerate(zip(images, encodings)):
                fmt, data = await encoding
                yield pb.GenerateEvent(image=pb.GeneratedImage(index=index, format=fmt, data=data,
                                                               width=image.width, height=image.height))
        finally:
            for encoding in encodings:
                encoding.cancel()
        job.timings["image_encode"] = time.perf_counter() - start
        t = job.timings
        yield pb.GenerateEvent(summary=pb.GenerationSummary(
            request_id=rid, mode=request.mode, effective=params_to_proto(job.params),
            ignored_parameters=job.ignored, width=images[0].width, height=images[0].height,
            timings=pb.Timings(queue_seconds=t["queue"], prepare_seconds=t.get("prepare", 0.0),
                               denoise_seconds=t.get("denoise", 0.0), decode_seconds=t.get("decode", 0.0),
                               image_encode_seconds=t["image_encode"], total_seconds=time.perf_counter() - received)))

    async def _run_job(self, job: GenerationJob, model: FluxGenerator, rid: str, preview_every: int,
                       stop: threading.Event):
        """Run the job on the model thread, streaming a progress event per step. If the
        caller goes away (cancel, deadline), the job stops at its next check (before each
        stage and each step)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        clock = {"start": 0.0, "last": 0.0}
        step_time = self.host.metrics.step_time.labels("generator")

        def on_step(step: int, total: int, preview) -> None:
            now = time.perf_counter()
            step_time.observe(now - clock["last"])
            clock["last"] = now
            progress = pb.Progress(step=step, total=total, stage="denoise", elapsed_seconds=now - clock["start"])
            if preview is not None:
                buf = io.BytesIO()
                preview.save(buf, format="JPEG", quality=80)
                progress.preview.data = buf.getvalue()
            loop.call_soon_threadsafe(events.put_nowait, progress)

        def work():
            clock["start"] = clock["last"] = time.perf_counter()
            try:
                return model.generate(job, on_step=on_step, cancelled=stop.is_set, preview_every=preview_every)
            except Cancelled as e:
                log_event("generation stopped", request_id=rid, detail=str(e))
                raise

        task = asyncio.ensure_future(self.host.run(work))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if nobody awaits
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                yield pb.GenerateEvent(progress=getter.result())
            while not events.empty():
                yield pb.GenerateEvent(progress=events.get_nowait())
            job.images = task.result()
        finally:
            if getter is not None and not getter.done():   # the caller left while we waited
                getter.cancel()
            if not task.done():
                stop.set()
                log_event("stopping generation", request_id=rid)

    @rpc_method
    async def GetInfo(self, request, context) -> pb.ServerInfo:
        model = self.host.require()
        return server_info("generator", model, self.args, modes=[m.value for m in Mode],
                           limits={"max_image_count": MAX_IMAGE_COUNT, "max_steps": MAX_STEPS,
                                   "max_output_pixels": MAX_OUTPUT_PIXELS, "max_pixel_steps": MAX_PIXEL_STEPS,
                                   "max_control_maps": MAX_CONTROL_MAPS, "max_guidance": MAX_GUIDANCE,
                                   "max_image_side": MAX_SIDE},
                           components=["flux-transformer", "vae", "scheduler", "controlnet (on first use)"],
                           startup=startup_info(model))


def startup_info(model: FluxGenerator) -> pb.Startup:
    cache, speed = model.compile_cache, model.speed
    detail = cache.detail if cache else ""
    if model.precompiled is not None and model.precompiled.obtained:
        how = [h.split(" ")[0] for h in model.precompiled.obtained.values()]
        detail += ("; " if detail else "") + "precompiled blocks: " + ", ".join(
            f"{how.count(h)} {h}" for h in sorted(set(how)))
    return pb.Startup(compile_cache=cache.status if cache else "off", compile_cache_detail=detail,
                      phase_seconds=dict(model.startup, **{f"compile_cache_{k}": v for k, v in
                                                           (cache.timings if cache else {}).items()}),
                      compiled=speed.compile, turbo=speed.turbo, step_cache=str(speed.step_cache or ""),
                      cuda_graphs=speed.cuda_graphs)
