"""Transformer blocks compiled ahead of time and kept in the compile cache: a warm start loads
them instead of tracing them.

torch.compile traces every block class again at each start, even when its kernels come from
the compile cache (Dynamo's bytecode analysis and fake-tensor propagation were most of a warm
start-up). `torch.compile(...).aot_compile` captures a graph once and serializes it with its
kernels; loading one takes a fraction of a second. There is one function per block class and
batch kind (torch specialises size 1; 2 and more share a graph), shared by every block of the
class and by the ControlNet's blocks: the block is an argument, so its weights are inputs.

The saved functions run without Dynamo's guards (they check tensor kinds, which inference mode
changes), so the choice is ours: block class and batch kind here, everything else (versions,
GPU, dtype, configuration, speed options, this code) in the compile cache's key. The shapes a
graph assumes are still asserted by its kernels. A function that fails to compile, load or run
is dropped with a log line, and that block class falls back to torch.compile.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Callable

import torch

from qwen2vl_flux.serving.server import log_event

from .blocks import repeated_blocks
from .compile_cache import write_atomically


def _hidden_states(args, kwargs) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _structure(block) -> str:
    """What a block's graph depends on beyond its class: its submodules' kinds and its tensors'
    names, dtypes and shapes (turbo's fp8 transformer blocks and the ControlNet's bf16 ones are
    one class with different insides)."""
    parts = [(name, type(module).__name__) for name, module in block.named_modules()]
    parts += [(name, str(t.dtype), tuple(t.shape)) for name, t in block.state_dict(keep_vars=True).items()]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


class _BlockForward:
    """A block's `forward`: the precompiled function for its kind. It pickles as nothing:
    torch pickles the callables in a guarded module's attributes with its guards, and this one
    reaches every compiled function."""

    def __init__(self, blocks: "PrecompiledBlocks", block, structure: str):
        self.blocks, self.block, self.structure = blocks, block, structure

    def __call__(self, *args, **kwargs):
        return self.blocks._call(self.block, self.structure, *args, **kwargs)

    def __reduce__(self):
        return object.__new__, (_BlockForward,)


class PrecompiledBlocks:
    """Installs itself as the `forward` of every repeated block of a model."""

    def __init__(self):
        self.save_to: Path | None = None      # where new functions are written (the cache entry)
        self.trusted: dict[str, str] = {}     # file name -> sha256 of functions that may be loaded
        self.functions: dict[str, Callable] = {}
        self.obtained: dict[str, str] = {}    # key -> "loaded" | "compiled" | "torch.compile (reason)"
        self.digests: dict[str, str] = {}     # file name -> sha256 of the functions in save_to
        self.on_saved: Callable[[], None] | None = None   # after each new file (the manifest lists it)
        self._fallbacks: dict[type, Callable] = {}

    def install(self, model) -> None:
        for block in repeated_blocks(model):
            block.forward = _BlockForward(self, block, _structure(block))

    def use_directory(self, directory: Path, trusted: dict[str, str]) -> None:
        """Load functions listed in `trusted` from `directory` and save new ones there."""
        self.save_to, self.trusted = directory, dict(trusted)

    def _call(self, block, structure: str, *args, **kwargs):
        batch = "1" if _hidden_states(args, kwargs).shape[0] == 1 else "n"
        key = f"{type(block).__name__}-{structure}-batch{batch}"
        fn = self.functions.get(key) or self._obtain(key, block, args, kwargs)
        try:
            return fn(block, *args, **kwargs)
        except AssertionError as e:   # the kernels' shape checks: a graph that does not fit these inputs
            if fn is self._fallbacks.get(type(block)):
                raise
            return self._drop(key, type(block), f"its shape checks failed: {e}")(block, *args, **kwargs)

    def _obtain(self, key: str, block, args, kwargs) -> Callable:
        fn = self._load(key) if f"{key}.bin" in self.trusted else None
        if fn is None:
            fn = self._compile(key, block, args, kwargs)
        self.functions[key] = fn
        return fn

    def _load(self, key: str) -> Callable | None:
        name = f"{key}.bin"
        try:
            data = (self.save_to / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != self.trusted[name]:
                raise ValueError("it does not match its checksum (truncated or corrupt)")
            fn = torch.compiler.load_compiled_function(io.BytesIO(data))
            fn.disable_guard_check()
        except Exception as e:  # noqa: BLE001 - a bad file costs a compile, never the server
            log_event("precompiled block ignored", block=key, file=str(self.save_to / name),
                      reason=f"{type(e).__name__}: {e}")
            return None
        self.digests[name] = self.trusted[name]
        self.obtained[key] = "loaded"
        return fn

    def _compile(self, key: str, block, args, kwargs) -> Callable:
        try:
            with torch._dynamo.config.patch(enable_aot_compile=True):   # off by default before torch 2.12
                wrapped = torch.compile(type(block).forward, fullgraph=True, dynamic=True,
                                        options={"guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe})
            compiled = wrapped.aot_compile(((block, *args), kwargs))
            compiled.disable_guard_check()
        except Exception as e:  # noqa: BLE001 - torch's ahead-of-time capture is young: fall back
            return self._drop(key, type(block), f"ahead-of-time compile failed: {type(e).__name__}: {e}")
        self.obtained[key] = "compiled"
        if self.save_to is not None:
            self._save(key, compiled)
        return compiled

    def _save(self, key: str, compiled) -> None:
        name = f"{key}.bin"
        try:
            data = type(compiled).serialize(compiled).serialized_data
            write_atomically(self.save_to / name, data)
        except Exception as e:  # noqa: BLE001 - unsaved: the next start compiles it again
            log_event("precompiled block not saved", block=key, reason=f"{type(e).__name__}: {e}")
            return
        self.digests[name] = hashlib.sha256(data).hexdigest()
        if self.on_saved is not None:
            self.on_saved()

    def _drop(self, key: str, cls: type, reason: str) -> Callable:
        log_event("precompiled block falls back to torch.compile", block=key, reason=reason)
        self.obtained[key] = f"torch.compile ({reason})"
        self.functions[key] = fn = self._fallback(cls)
        return fn

    def _fallback(self, cls: type) -> Callable:
        if cls not in self._fallbacks:
            self._fallbacks[cls] = torch.compile(cls.forward, fullgraph=True, dynamic=True)
        return self._fallbacks[cls]
