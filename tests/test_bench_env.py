"""The bench's server environment (bench/container_site.py): the servers' start-ups on the GPU
machine are timed in it, so it must hold what the server image installs and nothing the
image leaves out."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import container_site  # noqa: E402


def test_closure_is_the_server_extra_and_its_dependencies():
    found, missing = container_site.closure()
    assert {"torch", "diffusers", "transformers", "grpcio", "safetensors", "qwen2vl-flux"} <= set(found)
    # installed here for the tests, not by the server image
    for absent in ("pytest", "hypothesis", "fastapi"):
        assert importlib.util.find_spec(absent) is not None
        assert absent not in found
    assert missing == []
    # the installed metadata, not the egg-info a checkout holds (it lists sources)
    ours = Path(str(found["qwen2vl-flux"].locate_file(""))).resolve()
    assert not ours.is_relative_to(container_site.CHECKOUT), ours


def test_environment_runs_the_package_without_test_only_packages(tmp_path):
    python, line = container_site.build(tmp_path / "env")
    assert "distributions the server image installs" in line
    # run from the checkout, as the bench starts its servers (its folders and egg-info are on sys.path)
    probe = ("import importlib.util as u, torch, diffusers, qwen2vl_flux.generator_server.pipeline as p; "
             "print(p.__file__); print([m for m in ('pytest', 'hypothesis', 'fastapi') if u.find_spec(m)])")
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, cwd=container_site.CHECKOUT)
    assert out.returncode == 0, out.stderr[-2000:]
    module, leaked = out.stdout.split("\n")[:2]
    assert Path(module).resolve().is_relative_to(Path(__file__).resolve().parents[1])  # this checkout's code
    assert leaked == "[]"


@pytest.mark.parametrize("first", ["a", "b"])
def test_shared_folders_are_merged(tmp_path, first):
    """Two distributions with one namespace folder (nvidia/ of the CUDA wheels) both stay reachable."""
    for side, name in (("a", "cublas"), ("b", "cudnn")):
        (tmp_path / side / "nvidia" / name).mkdir(parents=True)
    site = tmp_path / "site"
    site.mkdir()
    for side in (first, "b" if first == "a" else "a"):
        container_site._link(site / "nvidia", tmp_path / side / "nvidia")
    assert sorted(p.name for p in (site / "nvidia").iterdir()) == ["cublas", "cudnn"]
