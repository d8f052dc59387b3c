"""Process shell shared by both servers: arguments, device and dtype, a grpc.aio
server with health and reflection, weights loaded after the port is bound (so
health answers NOT_SERVING while loading), error-to-status mapping, logs."""
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qwen2vl_flux.client.errors import InvalidArgument
from qwen2vl_flux.client.wire import MAX_MESSAGE_BYTES

log = logging.getLogger("qwen2vl_flux")


class NotReady(RuntimeError):
    """Weights are still loading."""


class Cancelled(RuntimeError):
    """The caller went away or its deadline passed; stop working for it."""


# ------------------------------------------------------------------ arguments

def base_parser(role: str, default_port: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"qwen2vl-flux-{role}", description=f"Qwen2VL-Flux {role} gRPC server")
    p.add_argument("--checkpoints", required=True, help="directory in the published Qwen2VL-Flux layout")
    p.add_argument("--device", default=None, help="torch device (default: see README)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--host", default="127.0.0.1", help="listen address (loopback unless asked)")
    p.add_argument("--port", type=int, default=default_port, help="0 picks a free port")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    p.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES)
    p.add_argument("--grace-seconds", type=float, default=30.0,
                   help="on SIGTERM, time given to running requests before exit")
    p.add_argument("--log-level", default="INFO")
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

class JsonFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "role": self.role,
                 "msg": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry)


def setup_logging(role: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(level.upper())


def log_event(msg: str, **fields: Any) -> None:
    log.info(msg, extra={"fields": fields})


# ------------------------------------------------------------------ errors

def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    import torch

    if isinstance(error, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    if isinstance(error, NotReady):
        return grpc.StatusCode.UNAVAILABLE, str(error)
    if isinstance(error, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(error)
    if isinstance(error, Cancelled):
        return grpc.StatusCode.CANCELLED, str(error)
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"GPU out of memory: {error}"
    return grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"


def rpc_method(fn: Callable) -> Callable:
    """Map exceptions of a unary RPC handler to gRPC statuses; log each call."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        start = time.perf_counter()
        rid = getattr(request, "request_id", "")
        try:
            response = await fn(self, request, context)
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            code, message = status_for(e)
            _log_failure(fn.__name__, rid, code, message, e, start)
            await context.abort(code, message)
        log_event("rpc done", rpc=fn.__name__, request_id=rid, status="OK",
                  seconds=round(time.perf_counter() - start, 4))
        return response

    return wrapper


def rpc_stream(fn: Callable) -> Callable:
    """The same for server-streaming handlers (async generators)."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        start = time.perf_counter()
        rid = getattr(request, "request_id", "")
        try:
            async for item in fn(self, request, context):
                yield item
        except asyncio.CancelledError:
            log_event("rpc cancelled by client", rpc=fn.__name__, request_id=rid)
            raise
        except Exception as e:  # noqa: BLE001
            code, message = status_for(e)
            _log_failure(fn.__name__, rid, code, message, e, start)
            await context.abort(code, message)
        log_event("rpc done", rpc=fn.__name__, request_id=rid, status="OK",
                  seconds=round(time.perf_counter() - start, 4))

    return wrapper


def _log_failure(rpc: str, rid: str, code, message: str, error: BaseException, start: float) -> None:
    fields = dict(rpc=rpc, request_id=rid, status=code.name, error=message,
                  seconds=round(time.perf_counter() - start, 4))
    if code is grpc.StatusCode.INTERNAL:
        log.error("rpc failed", exc_info=error, extra={"fields": fields})
    else:
        log_event("rpc failed", **fields)


# ------------------------------------------------------------------ the shell

class ModelHost:
    """Holds the model once loaded and runs its work on one thread, one request
    at a time, off the event loop (so health and streaming stay responsive)."""

    def __init__(self):
        self.model = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    def require(self):
        if self.model is None:
            raise NotReady("the model is still loading; retry when health reports SERVING")
        return self.model

    async def run(self, fn: Callable, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))


async def serve(args: argparse.Namespace, role: str, service_name: str, descriptor_names: list[str],
                add_servicer: Callable[[grpc.aio.Server, ModelHost], None],
                load_model: Callable[[], Any]) -> int:
    host = ModelHost()
    options = [("grpc.max_receive_message_length", args.max_message_bytes),
               ("grpc.max_send_message_length", args.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(options=options)
    add_servicer(server, host)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(descriptor_names + [health.SERVICE_NAME, reflection.SERVICE_NAME],
                                        server)
    for name in (service_name, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    if port == 0:
        raise SystemExit(f"cannot listen on {args.host}:{args.port}")
    await server.start()
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)
    log_event("listening", address=f"{args.host}:{port}", pid=os.getpid())

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    start = time.perf_counter()
    try:
        host.model = await loop.run_in_executor(host._executor, load_model)
    except Exception:  # noqa: BLE001 - a server without weights must not pretend to serve
        log.exception("loading the model failed", extra={"fields": {"checkpoints": args.checkpoints}})
        await server.stop(0)
        return 2
    for name in (service_name, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log_event("serving", load_seconds=round(time.perf_counter() - start, 2))

    await stopping.wait()
    log_event("draining", grace_seconds=args.grace_seconds)
    for name in (service_name, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(args.grace_seconds)
    log_event("stopped")
    return 0


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
        make_model: Callable[..., Any]) -> int:
    """A server process from argv to exit code: `make_model(checkpoints, device=, dtype=)`
    loads the weights once the port is bound; `add_servicer` registers the RPCs."""
    args = base_parser(role, default_port).parse_args(argv)
    setup_logging(role, args.log_level)
    device = resolve_device(args.device, role)
    dtype = resolve_dtype(args.dtype, device)
    return asyncio.run(serve(
        args, role, service, [service],
        lambda server, host: add_servicer(server, host, args),
        lambda: make_model(args.checkpoints, device=device, dtype=dtype)))
