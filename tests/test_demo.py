"""The README's main job: `qwen2vl-flux demo` from nothing to a PNG."""
from __future__ import annotations

import subprocess
import sys

from PIL import Image


def test_demo_starts_both_servers_and_writes_a_png(tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "qwen2vl_flux.client.cli", "demo", "--checkpoints", str(tiny_checkpoints),
         "--out", str(out), "--steps", "2", "--seed", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    assert len(paths) == 1 and paths[0] == str(out / "demo-1-0.png")
    with Image.open(paths[0]) as image:
        assert image.size == (1024, 1024)
        assert "qwen2vl-flux" in image.info
