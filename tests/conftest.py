"""Session fixtures: one tiny checkpoint and one pair of real server processes per
test run (start-up costs ~7 s of imports per process)."""
from __future__ import annotations

import pytest

from qwen2vl_flux.client import Client
from qwen2vl_flux.client.launch import ServerProcess


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    from qwen2vl_flux.checkpoints.tiny import make_tiny_checkpoints

    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def servers(tiny_checkpoints):
    started = [ServerProcess(role, tiny_checkpoints).start() for role in ("encoder", "generator")]
    try:
        for server in started:
            server.wait_serving()
        yield {server.role: server for server in started}
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def client(servers):
    with Client(encoder=servers["encoder"].address, generator=servers["generator"].address, timeout=120) as c:
        yield c
