"""Server logs: one JSON object per line on stderr (or readable text for people).

Everything else that would reach the terminal is routed into the same logger:
Python warnings, the transformers / diffusers loggers (which keep handlers of their
own), and, in JSON mode, whatever is written to the stdout / stderr descriptors
themselves (tqdm bars, tracebacks, gRPC's C core, torch's C++ warnings), read back
from a pipe one line at a time. Progress bars of model loading say nothing to an
operator and are switched off.
"""
from __future__ import annotations

import atexit
import importlib.abc
import json
import logging
import os
import sys
import threading
import time
import traceback

LOG_FORMATS = ("json", "text")
# Advice about the libraries' own install (we load without accelerate and use the PIL
# image processors on purpose): kept at DEBUG, not shown to operators by default.
LIBRARY_ADVICE = ("`accelerate` was not found", "requires torchvision")


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "role": self.role,
                 "msg": record.getMessage().rstrip("\n")}
        entry.update(getattr(record, "fields", {}))
        if not record.name.startswith("qwen2vl_flux"):
            entry["logger"] = record.name   # py.warnings, transformers..., diffusers...
        if record.exc_info:
            entry["error"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """`12:00:01 generator INFO serving load_seconds=6.5`: for a terminal."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        line = " ".join(part for part in (time.strftime("%H:%M:%S", time.localtime(record.created)), self.role,
                                          record.levelname, record.getMessage(), fields) if part)
        if record.exc_info:
            line += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return line


class _LibraryNoise(logging.Filter):
    """Repeats of one library message are dropped; install advice is demoted to DEBUG."""

    def __init__(self):
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("qwen2vl_flux"):
            return True
        message = record.getMessage()
        key = (record.name, message)
        if key in self._seen:
            return False
        self._seen.add(key)
        if any(advice in message for advice in LIBRARY_ADVICE):
            return logging.getLogger("qwen2vl_flux").isEnabledFor(logging.DEBUG)
        return True


def _route_library_logger(library) -> None:
    library.disable_default_handler()
    library.enable_propagation()
    library.disable_progress_bar()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `hooks[name](module)` right after module `name` first runs, so that configuring a
    library does not import it: importing diffusers pulls in torch._dynamo and sympy, transformers
    its own seconds, and a generator never needs transformers at all."""

    def __init__(self, hooks: dict):
        self.hooks = hooks

    def find_spec(self, name, path, target=None):
        if name not in self.hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        hook, run = self.hooks.pop(name), spec.loader.exec_module
        if not self.hooks:
            sys.meta_path.remove(self)

        def exec_module(module):
            run(module)
            hook(module)

        spec.loader.exec_module = exec_module
        return spec


def _route_library_loggers() -> None:
    """transformers and diffusers log through handlers of their own and draw tqdm bars:
    send their records to the root logger instead, without bars, once each is imported."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hooks = {}
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        if name in sys.modules:
            _route_library_logger(sys.modules[name])
        else:
            hooks[name] = _route_library_logger
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _AfterImport)]
    if hooks:
        sys.meta_path.insert(0, _AfterImport(hooks))


def _capture_descriptors(emit_to: int) -> None:
    """Point descriptors 1 and 2 at a pipe and log each line written there. Records go
    to `emit_to` (a duplicate of the real stderr), so they never loop back."""
    read_end, write_end = os.pipe()
    for fd in (1, 2):
        os.dup2(write_end, fd)
    os.close(write_end)
    native = logging.getLogger("qwen2vl_flux.stderr")

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                # tqdm redraws with carriage returns; keep the last state of the line
                text = text.rsplit("\r", 1)[-1].strip()
                if text:
                    native.warning(text, extra={"fields": {"source": "raw output"}})

    thread = threading.Thread(target=pump, name="stderr-to-json", daemon=True)
    thread.start()

    def drain() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for fd in (1, 2):
            os.dup2(emit_to, fd)  # the pipe's last writers close: the pump reads to its end
        thread.join(timeout=2)

    atexit.register(drain)


def _log_uncaught(kind, value, tb) -> None:
    """A crash as one record with its traceback, not as lines of raw output."""
    logging.getLogger("qwen2vl_flux").critical("uncaught exception", exc_info=(kind, value, tb))


def setup_logging(role: str, level: str, log_format: str = "json") -> None:
    """Root logger to stderr in `log_format`; libraries and raw writes routed into it (JSON)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    if log_format == "json":
        sys.stdout.flush()
        sys.stderr.flush()
        real_stderr = os.dup(2)
        stream = os.fdopen(real_stderr, "w", buffering=1, encoding="utf-8", errors="replace")
        _capture_descriptors(real_stderr)
        formatter: logging.Formatter = JsonFormatter(role)
        sys.excepthook = _log_uncaught
    else:
        stream, formatter = sys.stderr, TextFormatter(role)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(_LibraryNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("qwen2vl_flux").setLevel(level.upper())
    logging.captureWarnings(True)
    _route_library_loggers()
