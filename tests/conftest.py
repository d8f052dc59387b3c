"""Session fixtures: one tiny checkpoint and one pair of real server processes per
test run (start-up costs ~7 s of imports per process)."""
from __future__ import annotations

import pytest

from qwen2vl_flux.client import Client
from qwen2vl_flux.client.launch import ServerProcess, serving_pair


@pytest.fixture(scope="session", autouse=True)
def server_files_under_pytest_tmp(tmp_path_factory):
    """Servers' port files and logs in pytest's temp directory, which pytest prunes, not in /tmp."""
    ServerProcess.scratch_root = tmp_path_factory.mktemp("servers")
    yield ServerProcess.scratch_root
    ServerProcess.scratch_root = None


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    from qwen2vl_flux.checkpoints.tiny import make_tiny_checkpoints

    return make_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def servers(tiny_checkpoints):
    with serving_pair(tiny_checkpoints) as pair:
        yield {server.role: server for server in pair}


@pytest.fixture(scope="session")
def client(servers):
    with Client(encoder=servers["encoder"].address, generator=servers["generator"].address, timeout=120) as c:
        yield c
