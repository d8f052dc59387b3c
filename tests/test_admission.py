"""Admission to the model: one request runs, `--max-queue` wait, the rest are refused. Counted
right while a request already holds the model but is still preparing (decoding its uploads),
which on a busy CPU is where the first of a burst sits."""
from __future__ import annotations

import asyncio
import threading

from qwen2vl_flux.serving.server import ModelHost, QueueFull


def test_a_request_holding_the_model_while_it_prepares_counts_as_the_running_one():
    async def scenario():
        host = ModelHost("generator", max_queue=1)
        host.model = object()
        decoding = threading.Event()
        outcomes = []

        async def request(name, prepare=None):
            try:
                async with host.turn("Generate", prepare):
                    outcomes.append((name, "ran"))
                    await asyncio.sleep(0.05)
            except QueueFull:
                outcomes.append((name, "refused"))

        first = asyncio.create_task(request("first", lambda: decoding.wait(10)))
        while not host._turn.locked():        # it holds the model, its upload still decoding
            await asyncio.sleep(0.01)
        second = asyncio.create_task(request("second"))    # waits: the one queue place
        await asyncio.sleep(0.05)
        await request("third")                # one running and one waiting: full
        decoding.set()
        await asyncio.gather(first, second)
        return host, outcomes

    host, outcomes = asyncio.run(scenario())
    assert sorted(outcomes) == [("first", "ran"), ("second", "ran"), ("third", "refused")]
    assert host.admitted == 0 and host.waiting == 0 and not host._turn.locked()
