"""A step's velocity call (the transformer, and the ControlNet for its maps) replayed as one
CUDA graph.

A compiled step still launches about a thousand kernels from Python, one after another, and the
GPU waits for some of them: 4-10 ms of a 124-131 ms lossless step on an H100 (BENCHMARKS.md).
A graph launches them all at once. One graph is one step, never more: cancellation and progress
stay per step, and the step cache still decides per step whether the call runs.

A graph belongs to a key: every input's shape and dtype and the call's constants (the
ControlNet's modes and scales). It is captured the second request that meets its key, never
the first: a one-off shape pays nothing for a capture, and a first request is as fast as
without graphs. Before each replay the step's inputs are copied into the graph's own tensors.
The graphs share one memory pool (the generator runs one request at a time, so they never run
at once), and at most `limit` are kept, the least recently used dropped. The pool is apart from
the allocator's cache and keeps the working memory of the largest step captured, even after its
graph is dropped: with graphs a server needs up to one step's working memory more. A capture
that fails is logged with its cause and turns graphs off for the process (a failed capture may
leave CUDA state behind that the next one should not meet); every call then runs as before.
"""
from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from typing import Callable

import torch

from qwen2vl_flux.serving.server import log, log_event

Inputs = dict[str, "torch.Tensor | list[torch.Tensor] | None"]


def _flatten(inputs: Inputs) -> list[tuple[str, torch.Tensor]]:
    flat = []
    for name, value in inputs.items():
        if isinstance(value, (list, tuple)):
            flat += [(f"{name}[{i}]", t) for i, t in enumerate(value)]
        elif value is not None:
            flat.append((name, value))
    return flat


def _rebuild(inputs: Inputs, tensors: list[torch.Tensor]) -> Inputs:
    """`inputs` with its tensors replaced, in `_flatten`'s order."""
    it = iter(tensors)
    return {name: [next(it) for _ in value] if isinstance(value, (list, tuple)) else
            (None if value is None else next(it)) for name, value in inputs.items()}


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], output: torch.Tensor):
        self.graph, self.inputs, self.output = graph, inputs, output


class StepGraphs:
    """CUDA graphs of the velocity call, by key; see the module's docstring."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("StepGraphs needs a limit of at least one graph")
        self.limit = limit
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.met: dict[tuple, int] = {}     # key -> the request that first ran it without a graph
        self.failed = 0
        self.request = 0
        self.captures = self.replays = 0
        self._pool = None
        self._recording = True

    def new_request(self) -> None:
        self.request += 1

    @contextlib.contextmanager
    def unrecorded(self):
        """Calls that neither capture nor count as meeting a key (the start-up's warm-up runs,
        whose text length is not a request's); a key already captured still replays."""
        self._recording = False
        try:
            yield
        finally:
            self._recording = True

    def run(self, call: Callable[..., torch.Tensor], constants: tuple, inputs: Inputs) -> torch.Tensor:
        """`call(**inputs)`, through the key's graph when it has one (or gets one now)."""
        flat = _flatten(inputs)
        key = (constants, tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in flat))
        entry = self.graphs.get(key)
        if entry is None:
            if not self._recording or self.failed or self._meet(key):
                return call(**inputs)
            entry = self._capture(key, call, inputs, flat)
            if entry is None:
                return call(**inputs)
        else:
            self.graphs.move_to_end(key)
            torch._foreach_copy_(entry.inputs, [t for _, t in flat])
        entry.graph.replay()
        self.replays += 1
        return entry.output.clone()   # the caller's own tensor: the next replay overwrites the graph's

    def _meet(self, key: tuple) -> bool:
        """Whether this request is the first to meet `key` (which then runs without a graph)."""
        first = self.met.setdefault(key, self.request) == self.request
        while len(self.met) > 4096:   # a key per text length: forget the oldest
            del self.met[next(iter(self.met))]
        return first

    def _capture(self, key: tuple, call, inputs: Inputs, flat) -> _Graph | None:
        start = time.perf_counter()
        statics = [t.clone() for _, t in flat]
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # Our own stream, entered outside torch.cuda.graph: when a capture fails, that context's
        # exit raises before it restores the caller's stream; this one restores it regardless.
        stream, caller = torch.cuda.Stream(), torch.cuda.current_stream()
        stream.wait_stream(caller)
        try:
            with torch.cuda.stream(stream):
                # thread_local: the CUDA calls of the server's other threads (a request's
                # conditioning copied to the GPU while this one runs) do not break the capture
                with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                    output = call(**_rebuild(inputs, statics))
        except Exception as e:  # noqa: BLE001 - any failure: graphs off, every call as before
            cause = e.__context__ or e   # capture_end's error hides the one that broke the capture
            self.failed += 1
            self.graphs.clear()
            log.warning("step graph failed; CUDA graphs off for this process", extra={"fields": {
                "error": f"{type(cause).__name__}: {cause}"[:300], "then": f"{type(e).__name__}: {e}"[:200],
                "latents": list(flat[0][1].shape)}})
            return None
        finally:
            caller.wait_stream(stream)
        entry = _Graph(graph, statics, output)
        self.graphs[key] = entry
        while len(self.graphs) > self.limit:
            self.graphs.popitem(last=False)
        self.captures += 1
        log_event("step graph captured", seconds=round(time.perf_counter() - start, 3), kept=len(self.graphs),
                  latents=list(flat[0][1].shape), inputs=len(flat),
                  pool_reserved_gb=round(torch.cuda.memory_reserved() / 1e9, 2))
        return entry
