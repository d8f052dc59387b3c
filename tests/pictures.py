"""Test pictures: a gradient with a few random discs, the same for a given seed."""
from __future__ import annotations

import numpy as np
from PIL import Image


def picture(width: int, height: int, seed: int = 0, discs: int = 4) -> Image.Image:
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    rgb = np.stack([x * 255, y * 255, (1 - x) * 200 + 30], axis=-1)
    for _ in range(discs):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.25)
        rgb[(x - cx) ** 2 + (y - cy) ** 2 < r ** 2] = rng.integers(0, 255, 3)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
