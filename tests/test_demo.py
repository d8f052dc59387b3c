"""The README's main job: `qwen2vl-flux demo` from nothing to a PNG and the side-by-side picture."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from qwen2vl_flux.client.cli import DEMO_INPUT


def _demo(tmp_path, *args: str) -> list[str]:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "qwen2vl_flux.client.cli", "demo", "--out", str(tmp_path / "out"), *args],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, TMPDIR=str(scratch)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not list(scratch.glob("qwen2vl-flux-*"))   # the servers' logs go with them once the demo succeeded
    return [line for line in result.stdout.splitlines() if line.endswith(".png")]


def test_demo_uses_the_trained_model_and_writes_input_and_output_side_by_side(tmp_path):
    paths = _demo(tmp_path, "--steps", "4", "--seed", "1")
    out = tmp_path / "out"
    assert paths == [str(out / "demo-1-0.png"), str(out / "demo-1-side-by-side.png")]
    with Image.open(paths[0]) as image, Image.open(paths[1]) as pair, Image.open(DEMO_INPUT) as given:
        assert image.size == given.size == (128, 128)          # a variation the input's size
        assert "qwen2vl-flux" in image.info
        assert pair.size == (512, 256)                          # input | output, doubled
        halves = np.asarray(pair.convert("RGB").resize((256, 128), Image.Resampling.NEAREST))
        assert np.array_equal(halves[:, 128:], np.asarray(image.convert("RGB")))
        assert np.array_equal(halves[:, :128], np.asarray(given.convert("RGB")))


def test_demo_on_random_tiny_weights(tiny_checkpoints, tmp_path):
    paths = _demo(tmp_path, "--random-tiny", "--checkpoints", str(tiny_checkpoints), "--steps", "2",
                  "--seed", "1", "--aspect-ratio", "1:1")
    with Image.open(paths[0]) as image:
        assert image.size == (1024, 1024)
