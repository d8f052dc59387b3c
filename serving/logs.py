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


class _HookedLoader(importlib.abc.Loader):
    """Wraps one module's loader so that `hook(module)` runs right after the module does; every
    other loader method is the wrapped one's. A wrapper, not a patch of the loader itself, since
    some loaders (zip imports, finders that return themselves) serve many modules."""

    def __init__(self, loader, hook):
        self._loader, self._hook = loader, hook

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            self._hook(module)
        except Exception:  # noqa: BLE001 - a library's changed logging API must not break its import
            logging.getLogger("qwen2vl_flux").warning("could not route %s into our logs", module.__name__,
                                                      exc_info=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `hooks[name](module)` right after module `name` first runs, so that configuring a
    library does not import it: diffusers pulls in torch._dynamo and sympy, and the generator
    meets transformers only through diffusers, after its port is bound. It stays in
    `sys.meta_path` once its hooks are spent (a dict lookup an import): taking it out while
    another thread's import walks the list would skip the finder after it."""

    def __init__(self, hooks: dict):
        self.hooks = dict(hooks)

    def find_spec(self, name, path, target=None):
        hook = self.hooks.get(name)
        if hook is None:
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _AfterImport) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec

        def once(module):
            if self.hooks.pop(name, None) is not None:
                hook(module)

        spec.loader = _HookedLoader(spec.loader, once)
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
    # A new list, not an edit in place: an import under way in another thread keeps the old one.
    finders = [finder for finder in sys.meta_path if not isinstance(finder, _AfterImport)]
    sys.meta_path = [_AfterImport(hooks), *finders] if hooks else finders


_real_stderr: int | None = None   # a duplicate of the process's stderr, once 1 and 2 are captured


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
    global _real_stderr
    if log_format == "json" and _real_stderr is None:
        sys.stdout.flush()
        sys.stderr.flush()
        _real_stderr = os.dup(2)
        _capture_descriptors(_real_stderr)
    if _real_stderr is not None:
        # Once 1 and 2 feed the pipe, records must bypass it (or each would be read back as raw
        # output and logged again, forever): every later set-up writes to the real stderr too.
        stream = os.fdopen(os.dup(_real_stderr), "w", buffering=1, encoding="utf-8", errors="replace")
    else:
        stream = sys.stderr
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter(role)
        sys.excepthook = _log_uncaught
    else:
        formatter = TextFormatter(role)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(_LibraryNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("qwen2vl_flux").setLevel(level.upper())
    logging.captureWarnings(True)
    _route_library_loggers()
