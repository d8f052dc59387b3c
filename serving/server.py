"""Process shell shared by both servers: arguments, device and dtype, a grpc.aio
server with health and reflection, weights loaded after the port is bound (so
health answers NOT_SERVING while loading), error-to-status mapping, logs."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import hmac
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qwen2vl_flux.client.errors import InvalidArgument
from qwen2vl_flux.client.help_format import DefaultsHelpFormatter
from qwen2vl_flux.client.images import DEFAULT_MAX_PIXELS
from qwen2vl_flux.client.modes import check_request_id
from qwen2vl_flux.client.wire import MAX_MESSAGE_BYTES

from .logs import LOG_FORMATS, setup_logging
from .metrics import Metrics

log = logging.getLogger("qwen2vl_flux")


class NotReady(RuntimeError):
    """Weights are still loading."""


class Draining(RuntimeError):
    """SIGTERM arrived: running and queued requests finish, new ones go elsewhere."""


class QueueFull(RuntimeError):
    """More requests are waiting than --max-queue allows."""


class Cancelled(RuntimeError):
    """The caller went away or its deadline passed; stop working for it."""


# ------------------------------------------------------------------ arguments

def base_parser(role: str, default_port: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"qwen2vl-flux-{role}", description=f"Qwen2VL-Flux {role} gRPC server",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoints", required=True, help="directory in the published Qwen2VL-Flux layout")
    p.add_argument("--device", default=None, help="torch device (default: see README)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--random-weights", choices=["full"], default=None,
                   help="build full-size models with random weights on the device instead of loading them "
                        "(GPU tests and benchmarks); --checkpoints still supplies tokenizers and configs")
    p.add_argument("--host", default="127.0.0.1", help="listen address (loopback unless asked)")
    p.add_argument("--port", type=int, default=default_port, help="0 picks a free port")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    p.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES, help="gRPC message limit, each way")
    p.add_argument("--grace-seconds", type=float, default=30.0,
                   help="on SIGTERM, time given to running requests before exit")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests allowed to wait behind the running one; beyond: RESOURCE_EXHAUSTED at once")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="uploads larger than this are refused before decoding")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--token-file", default=None,
                   help="require this bearer token (file content; or set QWEN2VL_FLUX_TOKEN); health stays open")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, help="PEM CA: require client certificates (mutual TLS)")
    p.add_argument("--health-port", type=int, default=None,
                   help="also serve grpc.health.v1 alone, in plaintext, on this port (for probes under mTLS)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--log-format", default="json", choices=LOG_FORMATS,
                   help="json: one object per line on stderr, everything else routed into it; text: for people")
    return p


def resolve_device(requested: str | None, role: str) -> str:
    import torch

    if requested:
        return requested
    count = torch.cuda.device_count()
    if count == 0:
        return "cpu"
    # The split layout: encoder on GPU 0, generator on GPU 1 when there is one.
    return "cuda:1" if role == "generator" and count > 1 else "cuda:0"


def resolve_dtype(requested: str | None, device: str):
    import torch

    if requested:
        return getattr(torch, requested)
    return torch.float32 if device == "cpu" else torch.bfloat16


# ------------------------------------------------------------------ logging

def log_event(msg: str, **fields: Any) -> None:
    log.info(msg, extra={"fields": fields})


# ------------------------------------------------------------------ errors

def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    import torch

    if isinstance(error, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, (NotReady, Draining)):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(error)
    if isinstance(error, Cancelled):
        return grpc.StatusCode.CANCELLED, str(error)
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"GPU out of memory; memory was released, retry smaller: {error}"
    if _host_out_of_memory(error):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, ("out of host memory for this request; retry smaller "
                                                    f"(a smaller image, pixel budget or size): {error}")
    return grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"


def _host_out_of_memory(error: BaseException) -> bool:
    """torch's CPU allocator refusing an allocation (a request too large for this host's RAM)."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error))


def request_id(request, context) -> str:
    rid = getattr(request, "request_id", "")
    if not rid:
        rid = dict(context.invocation_metadata() or ()).get("x-request-id", "")
    return rid


class _Call:
    """Bookkeeping of one RPC: drain refusal, in-flight count, logs, metrics."""

    def __init__(self, host: "ModelHost", rpc: str, request, context):
        self.host, self.rpc = host, rpc
        self.rid = request_id(request, context)
        self.bad_rid = None
        try:
            check_request_id(self.rid)
        except InvalidArgument as e:
            self.bad_rid, self.rid = e, self.rid[:32] + "..."   # a 1 MB id must not reach the log
        self.start = time.perf_counter()

    def __enter__(self):
        if self.bad_rid is not None:
            raise self.bad_rid
        if self.host.draining:
            raise Draining("this server is shutting down; retry (another replica, or this one once restarted)")
        self.host.active += 1
        return self

    def __exit__(self, *exc):
        self.host.active -= 1

    def done(self, status: str, error: str = "", exc: BaseException | None = None) -> None:
        seconds = time.perf_counter() - self.start
        if self.host.metrics is not None:
            self.host.metrics.observe_rpc(self.rpc, status, seconds)
        fields = dict(rpc=self.rpc, request_id=self.rid, status=status, seconds=round(seconds, 4))
        if error:
            fields["error"] = error
        if status == "INTERNAL":
            log.error("rpc failed", exc_info=exc, extra={"fields": fields})
        else:
            log_event("rpc done" if status == "OK" else "rpc failed", **fields)


def rpc_method(fn: Callable) -> Callable:
    """Unary handler: every exception becomes a gRPC status with a message; each call is logged and counted."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        call = _Call(self.host, fn.__name__, request, context)
        try:
            with call:
                response = await fn(self, request, context)
        except asyncio.CancelledError:
            call.done("CANCELLED")
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            code, message = status_for(e)
            call.done(code.name, message, e)
            await context.abort(code, message)
        call.done("OK")
        return response

    return wrapper


def rpc_stream(fn: Callable) -> Callable:
    """The same for server-streaming handlers (async generators)."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        call = _Call(self.host, fn.__name__, request, context)
        try:
            with call:
                async for item in fn(self, request, context):
                    yield item
        except asyncio.CancelledError:
            call.done("CANCELLED")
            log_event("rpc cancelled by client", rpc=fn.__name__, request_id=call.rid)
            raise
        except Exception as e:  # noqa: BLE001
            code, message = status_for(e)
            call.done(code.name, message, e)
            await context.abort(code, message)
        call.done("OK")

    return wrapper


# ------------------------------------------------------------------ the shell

class ModelHost:
    """The model once loaded, the one thread it runs on, and admission to it: requests
    run one at a time in arrival order, at most `max_queue` wait, the rest are refused."""

    def __init__(self, role: str, max_queue: int, metrics: Metrics | None = None,
                 thread_init: Callable[[], None] | None = None):
        self.role, self.max_queue, self.metrics = role, max_queue, metrics
        self.model = None
        self.draining = False
        self.active = 0            # RPC handlers in flight (drain waits for them)
        self.waiting = 0
        self.admitted = 0          # waiting, plus the one holding the model until it lets go
        self._turn = asyncio.Lock()  # FIFO: waiters are woken in arrival order
        self._running = None         # the model thread's current job (concurrent future)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model", initializer=thread_init)

    def require(self):
        if self.model is None:
            raise NotReady("the model is still loading; retry when health reports SERVING")
        return self.model

    @contextlib.asynccontextmanager
    async def turn(self, rpc: str, prepare: Callable[[], Any] | None = None):
        """Wait for the model in arrival order, or be refused at once when the queue is full.

        Admission comes first: `prepare` (decoding uploads) runs in a worker thread while the
        request waits, counted as queued, so a refused request costs nothing. Yields a `Turn`
        with what `prepare` returned. The model is handed on only when the model thread has
        let go: a cancelled caller's job is told to stop (`Turn.stop`) and keeps the slot
        until it does, so the queue and its metrics stay true."""
        self.require()
        # Count every admitted request, whether it holds the model or not: one may hold the lock
        # while its `prepare` still runs, and a burst on an idle server is bounded too.
        if self.admitted >= self.max_queue + 1:
            if self.metrics is not None:
                self.metrics.rejected.labels(self.role, "queue_full").inc()
            raise QueueFull(f"{self.role} is busy: {self.waiting} requests already wait (--max-queue "
                            f"{self.max_queue}); retry later or add replicas")
        self.waiting += 1
        self.admitted += 1
        self._gauge()
        start = time.perf_counter()
        turn = Turn()
        acquire = asyncio.ensure_future(self._turn.acquire())
        preparing = asyncio.get_running_loop().run_in_executor(None, prepare) if prepare is not None else None
        try:
            if preparing is not None:
                turn.prepared = await asyncio.shield(preparing)
            await acquire
        except BaseException:
            acquire.cancel()
            if acquire.done() and not acquire.cancelled():
                self._turn.release()
            if preparing is not None and not preparing.done():
                # A decode cannot be interrupted: it stays counted as queued until it ends.
                preparing.add_done_callback(lambda f: (f.cancelled() or f.exception(), self._abandon()))
                raise
            self._abandon()
            raise
        self._leave_queue()
        if self.metrics is not None:
            self.metrics.queue_time.labels(self.role, rpc).observe(time.perf_counter() - start)
            self.metrics.in_flight.labels(self.role).set(1)
        try:
            yield turn
        finally:
            running = self._running
            if running is not None and not running.done():
                turn.stop.set()
                loop = asyncio.get_running_loop()
                running.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
            else:
                self._release()

    def _leave_queue(self) -> None:
        self.waiting -= 1
        self._gauge()

    def _abandon(self) -> None:
        """A request that leaves without its turn."""
        self._leave_queue()
        self.admitted -= 1

    def _release(self) -> None:
        self.admitted -= 1
        self._running = None
        self._turn.release()
        if self.metrics is not None:
            self.metrics.in_flight.labels(self.role).set(0)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queued.labels(self.role).set(self.waiting)

    async def run(self, fn: Callable, *args, **kwargs):
        """Run on the model thread. A CUDA out-of-memory error releases the cached
        memory before it propagates, so the next request starts clean."""

        def guarded():
            import torch

            try:
                return fn(*args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                raise

        self._running = self._executor.submit(guarded)
        return await asyncio.wrap_future(self._running)


class Turn:
    """One request's hold on the model: what was prepared while it waited, and the flag
    that tells its job on the model thread to stop (the caller went away)."""

    def __init__(self):
        self.prepared = None
        self.stop = threading.Event()


class TokenAuth(grpc.aio.ServerInterceptor):
    """Shared-token auth from `authorization: Bearer <token>` metadata. Health stays
    open so orchestrators' gRPC probes work without the secret. Refusals are counted
    (`rejected_total{reason="unauthenticated"}`) and logged with peer, RPC and reason,
    never the token, at most one line a second (the rest are counted in the next line)."""

    def __init__(self, token: str, metrics: Metrics | None = None, role: str = ""):
        self._expected = f"Bearer {token}".encode()
        self.metrics, self.role = metrics, role
        self._last_log, self._unlogged = 0.0, 0

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith("/grpc.health.v1.Health/") or handler is None:
            return handler
        given = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        if len(given) == 1 and hmac.compare_digest(_as_bytes(given[0]), self._expected):
            return handler
        if len(given) > 1:
            reason, message = "several authorization headers", "send exactly one 'authorization: Bearer <token>'"
        else:
            reason = "missing token" if not given else "wrong token"
            message = "missing or wrong token: send metadata 'authorization: Bearer <token>'"

        async def deny(request, context):
            self._refused(context.peer(), details.method, reason)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny, handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny, handler.request_deserializer, handler.response_serializer)

    def _refused(self, peer: str, method: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(self.role, "unauthenticated").inc()
        now = time.monotonic()
        if now - self._last_log < 1.0:
            self._unlogged += 1
            return
        log.warning("unauthenticated call refused", extra={"fields": dict(
            peer=peer, rpc=method, reason=reason, unlogged_since_last=self._unlogged)})
        self._last_log, self._unlogged = now, 0


def _as_bytes(value) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


class _Undecodable:
    def __init__(self, error: Exception):
        self.error = error


class RequestDecoding(grpc.aio.ServerInterceptor):
    """Bytes that do not parse as the request message get INVALID_ARGUMENT and a log
    line (gRPC alone answers UNKNOWN and logs nothing)."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith("/qwen2vl_flux.") or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return parse(data)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
                return _Undecodable(e)

        async def refuse(request, context):
            log.warning("undecodable request refused", extra={"fields": dict(
                peer=context.peer(), rpc=details.method, error=f"{type(request.error).__name__}: {request.error}")})
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request bytes are not a valid {details.method.rsplit('/', 1)[-1]} message")

        if handler.unary_stream:
            inner = handler.unary_stream

            async def stream(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                    return
                async for item in inner(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(stream, deserialize, handler.response_serializer)
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, deserialize, handler.response_serializer)
        return handler


def _read_token(args) -> str | None:
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    else:
        token = os.environ.get("QWEN2VL_FLUX_TOKEN", "").strip()
    return token or None


def _server_credentials(args) -> grpc.ServerCredentials | None:
    if not args.tls_cert and not args.tls_key:
        if args.tls_client_ca:
            raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (args.tls_cert and args.tls_key):
        raise SystemExit("TLS needs both --tls-cert and --tls-key")
    client_ca = Path(args.tls_client_ca).read_bytes() if args.tls_client_ca else None
    return grpc.ssl_server_credentials([(Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes())],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


async def serve(args: argparse.Namespace, role: str, service_name: str,
                add_servicer: Callable[[grpc.aio.Server, ModelHost], None],
                load_model: Callable[[], Any], thread_init: Callable[[], None] | None = None) -> int:
    """Bind, answer health NOT_SERVING while the weights load, then SERVING; on SIGTERM
    refuse new calls, let running and queued ones finish within --grace-seconds, exit 0.
    `thread_init` runs first in every worker thread (the model's and asyncio.to_thread's)."""
    if thread_init is not None:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(initializer=thread_init))
    metrics = Metrics(role)
    if args.metrics_port is not None:
        metrics.serve(args.host, args.metrics_port)
    host = ModelHost(role, args.max_queue, metrics, thread_init)
    options = [("grpc.max_receive_message_length", args.max_message_bytes),
               ("grpc.max_send_message_length", args.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    token = _read_token(args)
    interceptors = ([TokenAuth(token, metrics, role)] if token else []) + [RequestDecoding()]
    server = grpc.aio.server(options=options, interceptors=interceptors)
    add_servicer(server, host)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    async def set_health(status) -> None:
        for name in (service_name, ""):
            await health_servicer.set(name, status)

    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    credentials = _server_credentials(args)
    address = f"{args.host}:{args.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpc raises where it used to return 0
        port = 0
    if port == 0:
        raise SystemExit(f"cannot listen on {address}: the port is taken (another server running?) or the host "
                         "is not an address of this machine; choose another with --host / --port")
    servers = [server]
    if args.health_port is not None:
        probe = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe)
        probe.add_insecure_port(f"{args.host}:{args.health_port}")
        servers.append(probe)
    for s in servers:
        await s.start()
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
    log_event("listening", address=f"{args.host}:{port}", pid=os.getpid(), tls=credentials is not None,
              mutual_tls=bool(args.tls_client_ca), token=token is not None, max_queue=args.max_queue)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    start = time.perf_counter()
    loading = asyncio.ensure_future(loop.run_in_executor(host._executor, load_model))
    await asyncio.wait({loading, asyncio.ensure_future(stopping.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if not stopping.is_set():
        try:
            host.model = loading.result()
        except Exception:  # noqa: BLE001 - a server without weights must not pretend to serve
            log.exception("loading the model failed", extra={"fields": {"checkpoints": args.checkpoints}})
            for s in servers:
                await s.stop(0)
            return 2
        metrics.track_gpu(host.model.device)
        if getattr(host.model, "step_graphs", None) is not None:
            metrics.track_step_graphs(host.model.step_graphs)
        await set_health(health_pb2.HealthCheckResponse.SERVING)
        log_event("serving", load_seconds=round(time.perf_counter() - start, 2))
        await stopping.wait()

    host.draining = True
    await set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    log_event("draining", in_flight=host.active, grace_seconds=args.grace_seconds)
    deadline = time.monotonic() + args.grace_seconds
    while host.active and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for s in servers:
        await s.stop(max(0.0, deadline - time.monotonic()))
    log_event("stopped", unfinished=host.active)
    return 0


def server_info(role: str, model, args: argparse.Namespace, **fields) -> "pb.ServerInfo":
    """What GetInfo answers on both servers; `fields` adds the role's own (limits too)."""
    from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb

    from qwen2vl_flux.client.images import IMAGE_FORMATS
    from qwen2vl_flux.client.modes import MAX_REQUEST_ID_LENGTH, MIN_IMAGE_SIDE

    limits = pb.Limits(max_message_bytes=args.max_message_bytes, max_image_pixels=args.max_image_pixels,
                       max_queue=args.max_queue, max_request_id_length=MAX_REQUEST_ID_LENGTH,
                       min_image_side=MIN_IMAGE_SIDE, image_formats=IMAGE_FORMATS, **fields.pop("limits", {}))
    if model.layout.native_size is not None:
        fields.setdefault("native_size", model.layout.native_size)
    return pb.ServerInfo(role=role, fingerprint=model.fingerprint, dtype=str(model.dtype).removeprefix("torch."),
                         device=str(model.device), versions=pb.Versions(**versions()),
                         checkpoints=str(model.layout.root), limits=limits, **fields)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import google.protobuf

    from qwen2vl_flux.client.wire import API_VERSION

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return ""

    return {"package": v("qwen2vl-flux"), "api": API_VERSION, "torch": v("torch"),
            "transformers": v("transformers"), "diffusers": v("diffusers"), "grpc": grpc.__version__,
            "protobuf": google.protobuf.__version__}


def run(role: str, default_port: int, service: str, argv: list[str] | None,
        add_servicer: Callable[[grpc.aio.Server, ModelHost, argparse.Namespace], None],
        make_model: Callable[..., Any], extra_args: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """A server process from argv to exit code: `make_model(args, device=, dtype=)`
    loads the weights once the port is bound; `add_servicer` registers the RPCs."""
    parser = base_parser(role, default_port)
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    setup_logging(role, args.log_level, args.log_format)
    device = resolve_device(args.device, role)
    dtype = resolve_dtype(args.dtype, device)
    thread_init = None
    if device.startswith("cuda"):
        import torch

        # Make the model's GPU the current one, so nothing (events, compile, device guards
        # restoring "device 0") creates a CUDA context on GPU 0 behind our back. The current
        # device is per thread in CUDA, hence once here and once in every worker thread.
        def thread_init():
            torch.cuda.set_device(torch.device(device))

        thread_init()
    return asyncio.run(serve(
        args, role, service,
        lambda server, host: add_servicer(server, host, args),
        lambda: make_model(args, device=device, dtype=dtype), thread_init))
