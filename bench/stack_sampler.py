"""Run a module under a wall-clock stack sampler, to see where a start-up's seconds go:

  python bench/stack_sampler.py OUT.jsonl.gz -m qwen2vl_flux.generator_server ARGS...

Every few milliseconds a thread records each Python thread's stack. A sample weighs the wall time
since the one before, so time a C call holds the GIL (loading an extension module, creating the CUDA
context) is charged to the frame that made it rather than lost. Needs no ptrace, unlike py-spy.
Writes one JSON line per sample ({"t", "dt", "thread", "stack"}) after a table of the stacks seen;
`python bench/stack_sampler.py --summary OUT.jsonl.gz [--from T --to T]` prints the heaviest frames.
"""
from __future__ import annotations

import argparse
import atexit
import gzip
import json
import os
import runpy
import sys
import threading
import time
from collections import Counter

INTERVAL = 0.005


def _label(code) -> str:
    path = code.co_filename
    for marker in ("site-packages/", "dist-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{code.co_name}"


class Sampler(threading.Thread):
    def __init__(self, out: str):
        super().__init__(name="stack-sampler", daemon=True)
        self.out, self.began = out, time.time()
        self.stacks: dict[tuple, int] = {}
        self.samples: list[tuple[float, float, str, int]] = []
        self._done = threading.Event()

    def run(self) -> None:
        me, last = threading.get_ident(), time.perf_counter()
        while not self._done.wait(INTERVAL):
            now = time.perf_counter()
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack = []
                while frame is not None:
                    stack.append(_label(frame.f_code))
                    frame = frame.f_back
                key = tuple(reversed(stack))
                sid = self.stacks.setdefault(key, len(self.stacks))
                self.samples.append((time.time() - self.began, now - last, names.get(ident, str(ident)), sid))
            last = now

    def write(self) -> None:
        self._done.set()
        self.join()
        with gzip.open(self.out, "wt") as f:
            f.write(json.dumps({"began": self.began, "stacks": [list(s) for s in self.stacks]}) + "\n")
            for t, dt, thread, sid in list(self.samples):
                f.write(json.dumps({"t": round(t, 4), "dt": round(dt, 5), "thread": thread, "stack": sid}) + "\n")


def summary(path: str, start: float | None, end: float | None, top: int) -> None:
    """Inclusive seconds per frame (each frame counted once per sample), per thread."""
    with gzip.open(path, "rt") as f:
        head = json.loads(f.readline())
        stacks = head["stacks"]
        inclusive: dict[str, Counter] = {}
        for line in f:
            s = json.loads(line)
            if (start is not None and s["t"] < start) or (end is not None and s["t"] > end):
                continue
            counter = inclusive.setdefault(s["thread"], Counter())
            for frame in set(stacks[s["stack"]]):
                counter[frame] += s["dt"]
    for thread, counter in inclusive.items():
        print(f"== {thread}")
        for frame, seconds in counter.most_common(top):
            print(f"{seconds:8.2f}  {frame}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--summary":
        parser = argparse.ArgumentParser()
        parser.add_argument("--summary", required=True)
        parser.add_argument("--from", dest="start", type=float)
        parser.add_argument("--to", dest="end", type=float)
        parser.add_argument("--top", type=int, default=40)
        args = parser.parse_args()
        summary(args.summary, args.start, args.end, args.top)
        return
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        raise SystemExit(__doc__)
    out, module, rest = sys.argv[1], sys.argv[3], sys.argv[4:]
    sampler = Sampler(out)
    atexit.register(sampler.write)
    sampler.start()
    sys.argv = [module, *rest]
    sys.path[0] = os.getcwd()   # as `python -m` has it, not this script's folder
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
