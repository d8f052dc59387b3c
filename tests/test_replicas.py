"""Generator replicas behind one client: three generator processes on loopback, one encoder, and
`Client(generator="127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3")`, which spreads generations with
gRPC's round_robin. One replica is SIGKILLed mid-run: the requests in flight on it end with
UNAVAILABLE (never hang), every other request succeeds on the other two, and a client with
`retry_generation=True` runs the interrupted ones again elsewhere, with the same seed, to the
same bytes.

Making "in flight on the victim" deterministic: the victim is first frozen (SIGSTOP). Round robin
keeps picking it (its connection stays up), so every third generation a client starts from then
on is sent to it and stays there, in flight, until the SIGKILL. The servers' JSON logs tell which
replica served each request ("rpc done", "rpc": "Generate", with our request ids)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
from PIL import Image

from qwen2vl_flux.client import Client, ServiceError
from qwen2vl_flux.client.launch import ServerProcess

REQUESTS_PER_CLIENT = 15          # two clients: 30 generations
BEFORE_FREEZE = 6                 # per client; with three READY replicas round robin gives each two
THREADS_PER_CLIENT = 3
SIZES = [(32, 32), (48, 32), (64, 48), (32, 64), (48, 48)]
STUCK_SECONDS = 1.5               # a tiny generation takes ~0.1-0.5 s here; the frozen replica never answers
DEADLINE = 30.0                   # every call has one: nothing can hang


@dataclass
class Attempt:
    client: str
    request_id: str
    start: float
    end: float | None = None
    code: grpc.StatusCode | None = None


@dataclass
class Outcome:
    client: str
    request_id: str
    params: dict
    result: object = None
    error: ServiceError | None = None
    attempts: list[Attempt] = field(default_factory=list)


class AttemptRecorder:
    """Stands in for the client's generator stub: records each Generate attempt (the client's
    own retry included) with its start, end and final status, then defers to the real stub."""

    def __init__(self, stub, name: str, attempts: list[Attempt], lock: threading.Lock):
        self._stub, self._name, self._attempts, self._lock = stub, name, attempts, lock

    def __getattr__(self, item):
        return getattr(self._stub, item)

    def Generate(self, request, **kwargs):  # noqa: N802 - the stub's method name
        attempt = Attempt(self._name, request.request_id, time.monotonic())
        with self._lock:
            self._attempts.append(attempt)
        stream = self._stub.Generate(request, **kwargs)

        def events():
            try:
                yield from stream
                attempt.code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                attempt.code = e.code()
                raise
            finally:
                attempt.end = time.monotonic()

        return events()


def served(server: ServerProcess, prefix: str) -> dict[str, str]:
    """request_id -> status of the Generate calls this server logged as done or failed."""
    done = {}
    for line in server.log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("rpc") == "Generate" and entry.get("msg") in ("rpc done", "rpc failed") \
                and entry.get("request_id", "").startswith(prefix):
            done[entry["request_id"]] = entry["status"]
    return done


@pytest.fixture(scope="module")
def replicas(tiny_checkpoints, request):
    # Two more generators; they start while the session pair starts (or already runs).
    extra = [ServerProcess("generator", tiny_checkpoints).start() for _ in range(2)]
    try:
        session = request.getfixturevalue("servers")
        for server in extra:
            server.wait_serving()
        yield session["encoder"], [session["generator"], *extra]
    finally:
        for server in extra:
            if server.process is not None and server.process.poll() is None:
                os.kill(server.pid, signal.SIGCONT)
            server.kill()


def test_three_generators_one_killed_mid_run(replicas):
    encoder, generators = replicas
    victim = generators[2]
    survivors = generators[:2]
    prefix = f"replicas-{os.getpid()}-{time.monotonic_ns()}-"
    addresses = ",".join(g.address for g in generators)
    lock = threading.Lock()
    attempts: list[Attempt] = []
    clients = {"plain": Client(encoder.address, addresses, timeout=DEADLINE),
               "retry": Client(encoder.address, addresses, timeout=DEADLINE, retry_generation=True)}
    for name, client in clients.items():
        client._generator = AttemptRecorder(client._generator, name, attempts, lock)
        for _ in range(3):
            client.info()   # connects the channel: round robin then sees all three replicas READY

    bundle = clients["plain"].encode(Image.new("RGB", (64, 48), (200, 40, 40)))
    outcomes = {}
    for name in clients:
        for i in range(REQUESTS_PER_CLIENT):
            width, height = SIZES[i % len(SIZES)]
            rid = f"{prefix}{name}-{i:02d}"
            outcomes[rid] = Outcome(name, rid, dict(seed=1000 + i + (100 if name == "retry" else 0), steps=2,
                                                    width=width, height=height))

    def run(outcome: Outcome) -> None:
        try:
            outcome.result = clients[outcome.client].generate(bundle, request_id=outcome.request_id,
                                                              **outcome.params)
        except ServiceError as e:
            outcome.error = e

    by_client = {name: [o for o in outcomes.values() if o.client == name] for name in clients}
    pools = {name: ThreadPoolExecutor(THREADS_PER_CLIENT, thread_name_prefix=name) for name in clients}
    try:
        # 1. Twelve generations over all three replicas; every replica serves some.
        first = [pools[name].submit(run, o) for name in clients for o in by_client[name][:BEFORE_FREEZE]]
        for future in first:
            future.result(timeout=60)
        for server in generators:
            assert served(server, prefix), f"{server.address} served none of the first requests"

        # 2. Freeze the victim, start the other eighteen: those sent to it stay in flight there.
        os.kill(victim.pid, signal.SIGSTOP)
        rest = [pools[name].submit(run, o) for name in clients for o in by_client[name][BEFORE_FREEZE:]]
        give_up = time.monotonic() + 20
        while time.monotonic() < give_up:
            now = time.monotonic()
            with lock:
                open_attempts = [a for a in attempts if a.end is None]
            running = sum(f.running() for f in rest)
            # Steady: each busy thread waits on an attempt the frozen replica holds (open for longer
            # than any generation takes), and both clients have one there.
            if open_attempts and len(open_attempts) == running \
                    and all(now - a.start >= STUCK_SECONDS for a in open_attempts) \
                    and {a.client for a in open_attempts} == set(clients):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"no steady state with requests stuck on the frozen replica: {open_attempts}")

        # 3. SIGKILL it.
        kill_time = time.monotonic()
        victim.kill()
        for future in rest:
            future.result(timeout=2 * DEADLINE)
    finally:
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
    assert time.monotonic() - kill_time < DEADLINE, "the interrupted requests must fail fast, not at the deadline"

    # Who served what, from the servers' own logs.
    logs = {server.address: served(server, prefix) for server in generators}
    served_by = {}
    for address, requests in logs.items():
        for rid, status in requests.items():
            assert status == "OK", f"{rid} on {address}: {status}"
            assert rid not in served_by, f"{rid} ran twice: {served_by[rid]} and {address}"
            served_by[rid] = address
    survivors_addresses = {s.address for s in survivors}
    for attempt in attempts:
        outcomes[attempt.request_id].attempts.append(attempt)
    in_flight_at_kill = {a.request_id for a in attempts if a.start < kill_time and (a.end or 0) >= kill_time}

    # The plain client: requests in flight on the victim ended UNAVAILABLE; all others succeeded.
    plain = by_client["plain"]
    failed = [o for o in plain if o.error is not None]
    assert failed, "no request of the plain client was in flight on the killed replica"
    for o in failed:
        assert o.error.code == grpc.StatusCode.UNAVAILABLE, o.error
        assert o.request_id in in_flight_at_kill and o.request_id not in served_by
        assert len(o.attempts) == 1
    for o in plain:
        if o.error is None:
            assert len(o.result.images) == 1 and o.request_id in served_by
    assert len(failed) + sum(o.error is None for o in plain) == REQUESTS_PER_CLIENT

    # The retrying client: every request succeeded; the ones in flight on the victim ran again on
    # a survivor (two attempts, the first UNAVAILABLE).
    retry = by_client["retry"]
    assert all(o.error is None for o in retry), [str(o.error) for o in retry if o.error]
    retried = [o for o in retry if len(o.attempts) > 1]
    assert retried, "no request of the retrying client was in flight on the killed replica"
    for o in retried:
        first_attempt, second = o.attempts
        assert first_attempt.code == grpc.StatusCode.UNAVAILABLE and o.request_id in in_flight_at_kill
        assert second.code == grpc.StatusCode.OK and second.start >= first_attempt.end
        assert served_by[o.request_id] in survivors_addresses
    for o in retry:
        assert len(o.attempts) in (1, 2) and o.request_id in served_by

    # Nothing failed but what was in flight on the victim; after the kill, everything succeeded.
    for a in attempts:
        if a.code != grpc.StatusCode.OK:
            assert a.code == grpc.StatusCode.UNAVAILABLE and a.request_id in in_flight_at_kill
            assert a.request_id not in logs[victim.address]
        if a.start > kill_time:
            assert a.code == grpc.StatusCode.OK
    # All three replicas served generations; the victim none after it was frozen.
    assert all(logs[g.address] for g in generators)
    assert sum(o.error is None for o in outcomes.values()) == len(served_by) == 2 * REQUESTS_PER_CLIENT - len(failed)

    # The re-run gives the same images: the same request and seed again on each live replica.
    for survivor in survivors:
        with Client(encoder.address, survivor.address, timeout=DEADLINE) as direct:
            for o in retried:
                again = direct.generate(bundle, request_id=f"{o.request_id}-again", **o.params)
                assert again.data == o.result.data, f"{o.request_id}: different bytes on {survivor.address}"
                assert again.seed == o.result.seed == o.params["seed"]

    for client in clients.values():
        client.close()
    print(f"\nreplicas: {len(failed)} UNAVAILABLE without retry, {len(retried)} retried to the same bytes, "
          f"served per replica: {[len(logs[g.address]) for g in generators]}")
