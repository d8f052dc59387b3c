"""The ASGI app: the OpenAI Images API's image-in endpoints over `AsyncClient`.

A thin FastAPI layer: read the form (images_api.py), run the generation on the two
services, answer in OpenAI's shapes. It holds no model and no torch. A caller that
goes away cancels its gRPC call, so the generator stops the job within a step.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import json
import time
import uuid
from dataclasses import astuple, dataclass, field

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from qwen2vl_flux.client import AsyncClient, InvalidArgument, ServiceError, TLSFiles
from qwen2vl_flux.client.images import DEFAULT_MAX_PIXELS
from qwen2vl_flux.serving.metrics import Metrics
from qwen2vl_flux.serving.server import log, log_event

from .errors import APIError, from_service, invalid
from .images_api import Job, edit_job, variation_job
from .uploads import read_form

MODEL_NAME = "qwen2vl-flux"
KEEP_ALIVE_SECONDS = 15.0
MIME = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


@dataclass
class Settings:
    encoder: str = "127.0.0.1:50051"
    generator: str = "127.0.0.1:50052"
    api_keys: tuple[str, ...] = ()              # empty: no authentication
    backend_token: str | None = None
    tls: TLSFiles | None = None
    cors_origins: tuple[str, ...] = ()
    model_name: str = MODEL_NAME
    model_aliases: tuple[str, ...] = ()
    max_upload_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    timeout: float = 600.0
    retry_after: float = 2.0
    retry_generation: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name, *self.model_aliases)


class ClientGone(Exception):
    """The HTTP caller disconnected; its generation was cancelled."""


class Generation:
    """One generation in flight for one HTTP request: its events in a queue, and a
    watch on the connection that cancels the gRPC call when the caller goes."""

    def __init__(self, request: Request, client: AsyncClient, job: Job, request_id: str):
        self.request, self.job, self.request_id = request, job, request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.progressed = False
        self.partials = 0
        self.task = asyncio.ensure_future(self._work(client))
        self.gone = asyncio.ensure_future(self._disconnected())

    async def _disconnected(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass

    async def _progress(self, progress) -> None:
        self.progressed = True
        preview = None
        if progress.preview.data and self.partials < self.job.partial_images:
            preview, self.partials = progress.preview.data, self.partials + 1
        await self.queue.put(("progress", (progress, preview)))

    async def _work(self, client: AsyncClient) -> None:
        job = self.job
        try:
            result = await client.run(job.mode, job.image, reference=job.reference, prompt=job.prompt,
                                      focus=job.focus, mask=job.mask, line_detector=job.line_detector,
                                      progress=self._progress, output_format=job.output_format,
                                      request_id=self.request_id, preview_every=job.preview_every, **job.params)
        except ServiceError as e:
            await self.queue.put(("error", (e, "encode" if e.service.startswith("encoder") else "generate")))
        except InvalidArgument as e:
            await self.queue.put(("error", invalid(e)))
        except Exception as e:  # noqa: BLE001 - the caller gets an answer, the log the trace
            log.exception("generation failed in the gateway", extra={"fields": {"request_id": self.request_id}})
            await self.queue.put(("error", APIError(500, f"gateway error: {type(e).__name__}: {e}",
                                                    code="internal_error", retry=False)))
        else:
            await self.queue.put(("result", result))

    async def next(self, timeout: float | None = None):
        """The next (kind, value); None after `timeout` seconds without one."""
        getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({getter, self.gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if self.gone in done:
            await self.cancel("client disconnected")
            raise ClientGone()
        return None

    async def cancel(self, why: str) -> None:
        """Cancel the gRPC call (the generator stops the job); synchronous up to the
        wait, so it holds even when the surrounding scope is itself being cancelled."""
        self.gone.cancel()
        if not self.task.done():
            self.task.cancel()
            log_event("generation cancelled", request_id=self.request_id, reason=why)
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def close(self) -> None:
        self.gone.cancel()


def _error_of(value, retry_after: float, progressed: bool) -> APIError:
    if isinstance(value, APIError):
        return value
    error, stage = value
    return from_service(error, stage, progressed, retry_after)


def _image_entry(data: bytes, fmt: str, response_format: str) -> dict:
    encoded = base64.b64encode(data).decode()
    if response_format == "url":
        return {"url": f"data:{MIME[fmt]};base64,{encoded}"}
    return {"b64_json": encoded}


def _ours(settings: Settings, job: Job, result, request_id: str) -> dict:
    """Our extra field: the seed and effective parameters (send them back to repeat an image)."""
    return {"model": settings.model_name, "mode": job.mode.value, "seed": result.seed, "parameters": result.parameters,
            "ignored_parameters": sorted(set(result.ignored_parameters) | set(job.ignored)),
            "mask": job.mask_semantics, "focus": list(astuple(job.focus)) if job.focus else None,
            "request_id": request_id, "timings": result.timings}


def _size(result) -> str:
    width, height = result.images.sizes[0]
    return f"{width}x{height}"


def create_app(settings: Settings) -> FastAPI:
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if "client" in state:
            await state["client"].close()

    app = FastAPI(title="Qwen2VL-Flux OpenAI-compatible gateway", docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    metrics = Metrics("gateway")
    disconnects = Counter("qwen2vl_flux_gateway_disconnects_total",
                          "HTTP callers that went away mid-generation (their gRPC call was cancelled)",
                          registry=metrics.registry)

    def client() -> AsyncClient:
        # Made inside the server's event loop (grpc.aio channels belong to one loop).
        if "client" not in state:
            state["client"] = AsyncClient(settings.encoder, settings.generator, timeout=settings.timeout,
                                          token=settings.backend_token, tls=settings.tls,
                                          retry_generation=settings.retry_generation)
        return state["client"]

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        headers = error.headers()
        if getattr(request.state, "request_id", None):
            headers["x-request-id"] = request.state.request_id
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(InvalidArgument)
    async def invalid_argument(request: Request, error: InvalidArgument):
        return await api_error(request, invalid(error))

    @app.exception_handler(404)
    async def not_found(request: Request, error):
        return await api_error(request, APIError(404, f"no route {request.method} {request.url.path}; this gateway "
                                                      "serves /v1/images/variations, /v1/images/edits, /v1/models",
                                                 code="not_found"))

    @app.exception_handler(405)
    async def wrong_method(request: Request, error):
        return await api_error(request, APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                                 code="method_not_allowed"))

    def authorize(request: Request) -> None:
        if not settings.api_keys:
            return
        given = request.headers.get("authorization", "")
        key = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.api_keys):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with a key from the "
                                "gateway's --api-key-file", code="invalid_api_key")

    async def run(request: Request, make_job) -> Response:
        authorize(request)
        request_id = request.state.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        form = await read_form(request, settings.max_upload_bytes)
        job = make_job(form, settings.model_names, settings.max_image_pixels)
        log_event("request", route=request.url.path, request_id=request_id, mode=job.mode.value,
                  user=job.user, stream=job.stream)
        generation = Generation(request, client(), job, request_id)
        try:
            if job.stream:
                return await stream(generation)
            while True:
                kind, value = await generation.next()
                if kind == "result":
                    break
                if kind == "error":
                    raise _error_of(value, settings.retry_after, generation.progressed)
        except ClientGone:
            disconnects.inc()
            return Response(status_code=499)
        finally:
            if not job.stream:   # done, failed, or this handler cancelled: nothing keeps running
                await generation.cancel("request ended")
        created = int(time.time())
        body = {"created": created, "data": [_image_entry(d, job.output_format, job.response_format)
                                             for d in value.data],
                "output_format": job.output_format, "size": _size(value), "background": "opaque",
                "qwen2vl_flux": _ours(settings, job, value, request_id)}
        return JSONResponse(body, headers={"x-request-id": request_id})

    async def stream(generation: Generation) -> Response:
        """Server-sent events in OpenAI's image_edit.* shapes. The HTTP status waits for
        the job to start (its first step), so a refusal is still a proper status."""
        job, request_id = generation.job, generation.request_id
        first = await generation.next()
        if first[0] == "error":
            generation.close()
            raise _error_of(first[1], settings.retry_after, generation.progressed)

        def event(name: str, data: dict) -> bytes:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        async def body():
            item, index = first, 0
            try:
                while True:
                    if item is None:
                        yield b": keep-alive\n\n"
                    elif item[0] == "progress":
                        preview = item[1][1]
                        if preview is not None:
                            with Image.open(io.BytesIO(preview)) as picture:
                                size = f"{picture.width}x{picture.height}"
                            yield event("image_edit.partial_image", {
                                "type": "image_edit.partial_image", "b64_json": base64.b64encode(preview).decode(),
                                "partial_image_index": index, "created_at": int(time.time()), "size": size,
                                "quality": "auto", "background": "opaque", "output_format": "jpeg"})
                            index += 1
                    elif item[0] == "error":
                        error = _error_of(item[1], settings.retry_after, True)
                        yield event("error", error.body())
                        return
                    else:
                        result = item[1]
                        for number, data in enumerate(result.data):
                            yield event("image_edit.completed", {
                                "type": "image_edit.completed", "b64_json": base64.b64encode(data).decode(),
                                "created_at": int(time.time()), "size": _size(result), "quality": "auto",
                                "background": "opaque", "output_format": job.output_format, "index": number,
                                "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
                                          "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}},
                                "qwen2vl_flux": _ours(settings, job, result, request_id)})
                        return
                    item = await generation.next(timeout=KEEP_ALIVE_SECONDS)
            except ClientGone:
                disconnects.inc()
            finally:
                await generation.cancel("stream closed")

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"x-request-id": request_id, "cache-control": "no-cache"})

    @app.post("/v1/images/variations")
    async def variations(request: Request):
        return await run(request, variation_job)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        return await run(request, edit_job)

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        authorize(request)
        raise APIError(400, "Qwen2VL-Flux always starts from an image, so text-to-image cannot run here: use "
                            "POST /v1/images/variations (an image in, variations out) or POST /v1/images/edits "
                            "(an image, an optional mask and a prompt)", param="image", code="image_required")

    def model_entry() -> dict:
        return {"id": settings.model_name, "object": "model", "created": settings.created, "owned_by": "qwen2vl-flux"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_entry()]}

    @app.get("/v1/models/{name}")
    async def model(request: Request, name: str):
        authorize(request)
        if name not in settings.model_names:
            raise APIError(404, f"model {name!r} is not served here; this gateway serves {settings.model_name!r}",
                           param="model", code="model_not_found")
        return model_entry()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Ready when an encoder and a generator answer (both SERVING: loading or draining ones refuse)."""
        try:
            info = await client().info(timeout=3.0)
        except ServiceError as e:
            return JSONResponse({"status": "not ready", "error": str(e)}, status_code=503)
        return {"status": "ready", "encoder": info["encoder"].device, "generator": info["generator"].device,
                "checkpoint_id": info["generator"].fingerprint.checkpoint_id}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    handler = _Observed(app, metrics)
    if settings.cors_origins:
        handler = CORSMiddleware(handler, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                                 allow_headers=["authorization", "content-type", "x-request-id"],
                                 expose_headers=["x-request-id", "retry-after"])
    return handler


class _Observed:
    """ASGI middleware: every HTTP request counted, timed and logged under role "gateway"."""

    ROUTES = {"/v1/images/variations", "/v1/images/edits", "/v1/images/generations", "/v1/models", "/healthz",
              "/readyz", "/metrics"}

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in self.ROUTES else ("/v1/models/{name}" if path.startswith("/v1/models/") else "other")
        status = {"code": 500}
        start = time.perf_counter()
        gauge = self.metrics.in_flight.labels("gateway")

        async def watched_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        gauge.inc()
        try:
            await self.app(scope, receive, watched_send)
        finally:
            gauge.dec()
            seconds = time.perf_counter() - start
            self.metrics.observe_rpc(route, str(status["code"]), seconds)
            if route not in ("/healthz", "/readyz", "/metrics"):
                log_event("http done", route=route, method=scope["method"], status=status["code"],
                          seconds=round(seconds, 4))
