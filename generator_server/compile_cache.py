"""Compiled kernels kept across restarts: `--compile-cache DIR`.

After warm-up the generator saves torch's portable cache artifacts
(`torch.compiler.save_cache_artifacts`: Inductor's FX graphs, AOT autograd entries, Triton
kernels, autotuning results) under a key of everything that decides the kernels: library
versions, GPU, dtype, model configuration, speed options and our code, and beside them the
transformer blocks compiled ahead of time (precompiled.py, checksums in the manifest). The
next start with the same key loads both before warm-up, which then neither traces nor
compiles. A missing entry is a miss; a foreign or corrupt one is ignored with a log line;
neither stops the server.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen2vl_flux.serving.server import log_event

MANIFEST, ARTIFACTS = "manifest.json", "artifacts.bin"


def cache_fields(model, options) -> dict:
    """What the compiled kernels depend on; any change selects another entry."""
    from importlib.metadata import version

    device = model.device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    capability = list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else []
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    def config(module) -> dict:   # architecture only: not where the weights were read from
        return {k: v for k, v in module.config.items() if not k.startswith("_")}

    # Our code decides the traced graphs too (layouts, compile settings): an entry written by
    # another version would hit, lack the graphs this one traces, and never be rewritten.
    code = hashlib.sha256(b"".join((Path(__file__).parent / name).read_bytes()
                                   for name in ("pipeline.py", "blocks.py", "modulation.py", "fp8.py", "precompiled.py",
                                                "compile_cache.py"))).hexdigest()[:16]
    fields = {"torch": torch.__version__, "diffusers": version("diffusers"), "triton": triton_version,
              "generator_code": code,
              "cuda": torch.version.cuda or "", "gpu": gpu, "capability": capability, "dtype": str(model.dtype),
              "transformer": config(model.transformer), "vae": config(model.vae),
              "options": {"compile": options.compile, "attention": options.attention, "turbo": options.turbo}}
    return json.loads(json.dumps(fields, default=str))   # plain JSON values, as a manifest reads back


def write_atomically(path: Path, content: bytes) -> None:
    """A reader sees the old file or the new one, never a part (a start killed mid-write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(content)
    os.replace(tmp, path)


@dataclass
class CompileCache:
    root: Path
    fields: dict
    status: str = "off"        # off | hit | miss | ignored | saved
    detail: str = ""
    timings: dict = field(default_factory=dict)
    blocks: dict = field(default_factory=dict)   # precompiled block file -> sha256, from a hit's manifest

    @property
    def key(self) -> str:
        blob = json.dumps(self.fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    @property
    def entry(self) -> Path:
        return self.root / self.key

    @property
    def blocks_dir(self) -> Path:
        """Where the precompiled transformer blocks of this entry live (precompiled.py)."""
        return self.entry / "blocks"

    def load(self) -> bool:
        """Load the entry for this key into torch's caches; True on a hit."""
        start = time.perf_counter()
        manifest = self.entry / MANIFEST
        if not manifest.exists():
            return self._miss(f"no entry for key {self.key} in {self.root}; kernels are compiled and saved")
        try:
            meta = json.loads(manifest.read_text())
            data = (self.entry / ARTIFACTS).read_bytes()
            if meta.get("fields") != self.fields:
                raise ValueError("it was written for another configuration")
            if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
                raise ValueError("its artifacts do not match their checksum (truncated or corrupt)")
            torch.compiler.load_cache_artifacts(data)
        except Exception as e:  # noqa: BLE001 - a bad cache costs a compile, never the server
            self.status, self.detail = "ignored", f"{manifest.parent}: {type(e).__name__}: {e}"
            log_event("compile cache ignored", cache=str(self.root), key=self.key, reason=self.detail)
            return False
        self.status, self.detail = "hit", f"{len(data)} bytes"
        self.blocks = dict(meta.get("blocks", {}))
        self.timings["load"] = time.perf_counter() - start
        log_event("compile cache hit", cache=str(self.root), key=self.key, bytes=len(data),
                  seconds=round(self.timings["load"], 2))
        return True

    def _miss(self, detail: str) -> bool:
        self.status, self.detail = "miss", detail
        log_event("compile cache miss", cache=str(self.root), key=self.key, detail=detail)
        return False

    def save(self, blocks: dict | None = None) -> None:
        """Write what this process compiled (after warm-up) with the checksums of the precompiled
        block files it wrote or loaded; again whenever a block is compiled later (the ControlNet's,
        on first use). A hit has no new artifacts: its manifest is rewritten only when its blocks
        changed (one compiled later, or one that failed to load and was compiled again)."""
        blocks = dict(blocks or {})
        start = time.perf_counter()
        if self.status == "hit":
            if blocks == self.blocks:
                return
            try:
                data = (self.entry / ARTIFACTS).read_bytes()
            except OSError as e:
                log_event("compile cache not saved", cache=str(self.root), key=self.key, reason=str(e))
                return
        else:
            saved = torch.compiler.save_cache_artifacts()
            if saved is None:
                log_event("compile cache not saved", cache=str(self.root), key=self.key,
                          reason="torch recorded no compiled artifacts")
                return
            data = saved[0]
        try:
            if self.status != "hit":   # a hit's artifacts are on disk already
                write_atomically(self.entry / ARTIFACTS, data)
            write_atomically(self.entry / MANIFEST, json.dumps(
                {"fields": self.fields, "sha256": hashlib.sha256(data).hexdigest(),
                 "blocks": blocks, "written": time.time()}, indent=1).encode())
        except OSError as e:
            log_event("compile cache not saved", cache=str(self.root), key=self.key, reason=str(e))
            return
        self.status, self.blocks = ("hit" if self.status == "hit" else "saved"), blocks
        self.timings["save"] = time.perf_counter() - start
        log_event("compile cache saved", cache=str(self.root), key=self.key, bytes=len(data),
                  precompiled_blocks=len(blocks), seconds=round(self.timings["save"], 2))
