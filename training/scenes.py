"""Seeded, deterministic scenes of coloured shapes for training and testing a tiny Qwen2VL-Flux.

Everything is derived from the layout (a `Scene`), never from pixels, so captions, depth maps,
edge maps and masks are exact ground truth: tests can check what the model paints against them.
Coordinates are fractions of the image (0..1), so one scene renders at any size; a pixel belongs
to a shape when its centre does, which keeps rendering exact, alias-free and fast (numpy only).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
from PIL import Image

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30),
    "white": (245, 245, 245), "black": (20, 20, 20),
}
COLOURS = tuple(PALETTE)
KINDS = ("circle", "square", "triangle")
BACKGROUNDS = ("solid", "gradient", "stripes")
BACKGROUND_DEPTH = 0.1  # the background is the farthest thing: dark in the depth map
DEPTH_LEVELS = np.linspace(0.4, 1.0, 7)  # distinct levels, so the front shape is unambiguous
_PATCH = np.linspace(-0.05, 0.05, 5)[None, :]  # a patch around each centre stays uncovered
TRAIN_SEED = 0
HELD_OUT_SEED = 1_000_003  # never used for training: semantic tests draw their inputs here


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # a PALETTE name
    cx: float  # centre, fractions of width / height
    cy: float
    r: float  # half-extent (radius, half side), fraction of the image
    depth: float  # 0 (far) .. 1 (near); nearer shapes are drawn over farther ones


@dataclass(frozen=True)
class Scene:
    background: str  # one of BACKGROUNDS
    colours: tuple[str, ...]  # one colour for "solid", two for "gradient" / "stripes"
    vertical: bool  # gradient / stripes run top-to-bottom instead of left-to-right
    bands: int  # number of stripes (ignored otherwise)
    shapes: tuple[Shape, ...]  # back to front (ascending depth): draw order


def _inside(s: Shape, x, y):
    """Whether points (fractions) lie in the shape; works on scalars and arrays alike."""
    dx, dy = x - s.cx, y - s.cy
    if s.kind == "circle":
        return dx * dx + dy * dy <= s.r * s.r
    if s.kind == "square":
        return (np.abs(dx) <= s.r) & (np.abs(dy) <= s.r)
    # triangle pointing up: apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
    return (dy <= s.r) & (2 * np.abs(dx) <= dy + s.r)


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene. A patch around each shape's centre stays uncovered, so every shape the
    caption names can be seen (and its colour read at its centre)."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    n_bg = 1 if background == "solid" else 2
    bg = tuple(COLOURS[i] for i in rng.choice(len(COLOURS), n_bg, replace=False))
    vertical, bands = bool(rng.integers(2)), int(rng.integers(4, 9))
    free = [c for c in COLOURS if c not in bg]  # shapes never vanish into the background
    n = int(rng.integers(1, 4))
    for _ in range(50):  # rejection sampling; the rng sequence keeps it deterministic
        colours = rng.choice(len(free), n, replace=False)
        depths = np.sort(rng.choice(DEPTH_LEVELS, n, replace=False))
        shapes = []
        for colour, depth in zip(colours, depths):
            r = float(rng.uniform(0.12, 0.25))
            cx, cy = (float(v) for v in rng.uniform(r, 1 - r, 2))
            kind = KINDS[rng.integers(len(KINDS))]
            shapes.append(Shape(kind, free[colour], cx, cy, r, float(depth)))
        if not any(_inside(b, a.cx + _PATCH, a.cy + _PATCH.T).any()
                   for i, a in enumerate(shapes) for b in shapes[i + 1:]):
            break
    else:
        shapes = shapes[-1:]  # unreachable in practice; one shape is always valid
    return Scene(background, bg, vertical, bands, tuple(shapes))


def _grid(size) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as fractions; size is an int (square) or (width, height)."""
    w, h = (size, size) if isinstance(size, int) else size
    return np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h)


def labels(scene: Scene, size) -> np.ndarray:
    """Index of the front shape at each pixel, -1 for background: occlusion in one array."""
    x, y = _grid(size)
    out = np.full(x.shape, -1, dtype=np.int16)
    for i, s in enumerate(scene.shapes):  # back to front: later (nearer) shapes overwrite
        out[_inside(s, x, y)] = i
    return out


def render(scene: Scene, size) -> Image.Image:
    """The RGB picture: background, then shapes back to front."""
    x, y = _grid(size)
    t = y if scene.vertical else x
    c = [np.array(PALETTE[name], dtype=np.float32) for name in scene.colours]
    if scene.background == "solid":
        img = np.broadcast_to(c[0], x.shape + (3,)).copy()
    elif scene.background == "gradient":
        img = c[0] * (1 - t[..., None]) + c[1] * t[..., None]
    else:
        img = np.where((np.floor(t * scene.bands) % 2 == 0)[..., None], c[0], c[1])
    img = np.rint(img).astype(np.uint8)
    lab = labels(scene, size)
    for i, s in enumerate(scene.shapes):
        img[lab == i] = PALETTE[s.colour]
    return Image.fromarray(img, "RGB")


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(scene: Scene) -> str:
    """Deterministic words: shapes back to front, then the background."""
    things = [_a(f"{s.colour} {s.kind}") for s in scene.shapes]
    listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    if scene.background == "solid":
        bg = _a(f"{scene.colours[0]} background")
    elif scene.background == "gradient":
        bg = _a(f"{scene.colours[0]} to {scene.colours[1]} gradient background")
    else:
        bg = _a(f"{scene.colours[0]} and {scene.colours[1]} striped background")
    return f"{listed} on {bg}"


def depth_map(scene: Scene, size) -> Image.Image:
    """Depth from the layout (bright = near); the front shape's depth wins where shapes overlap."""
    lab = labels(scene, size)
    depths = np.array([BACKGROUND_DEPTH] + [s.depth for s in scene.shapes], dtype=np.float32)
    return Image.fromarray(np.rint(depths[lab + 1] * 255).astype(np.uint8), "L")


def edge_map(scene: Scene, size) -> Image.Image:
    """Visible object boundaries (2 px: both sides of each change of front shape), 255 on edges.

    Background stripes and gradients are not objects, so they draw no edges."""
    lab = labels(scene, size)
    edge = np.zeros(lab.shape, dtype=bool)
    dx, dy = lab[:, 1:] != lab[:, :-1], lab[1:, :] != lab[:-1, :]
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    return Image.fromarray(edge.astype(np.uint8) * 255, "L")


def mask_for(scene: Scene, index: int, size, visible: bool = False) -> Image.Image:
    """A shape's mask (255 inside) for inpainting: its whole silhouette, or only what is seen."""
    if visible:
        inside = labels(scene, size) == index
    else:
        inside = _inside(scene.shapes[index], *_grid(size))
    return Image.fromarray(inside.astype(np.uint8) * 255, "L")


def recoloured(scene: Scene, rng: np.random.Generator, which: list[int]) -> Scene:
    """The shapes at `which` in another colour (never a background colour): a picture whose
    colours a prompt has to correct."""
    free = [c for c in COLOURS if c not in scene.colours]
    shapes = list(scene.shapes)
    for i in which:
        others = [c for c in free if c != shapes[i].colour]
        shapes[i] = replace(shapes[i], colour=others[rng.integers(len(others))])
    return replace(scene, shapes=tuple(shapes))


def mean_fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked pixels set to the mean colour of the others: the inpainting baseline, and a
    picture with a hole a prompt has to fill."""
    pixels = np.asarray(image.convert("RGB")).copy()
    inside = np.asarray(mask.convert("L")) > 127
    if inside.any() and not inside.all():
        pixels[inside] = np.rint(pixels[~inside].reshape(-1, 3).mean(axis=0)).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def scenes(seed: int, count: int) -> Iterator[Scene]:
    """Scene i depends only on (seed, i): any item can be regenerated alone."""
    for i in range(count):
        yield sample_scene(np.random.default_rng([seed, i]))


Sample = tuple[Image.Image, str, Image.Image, Image.Image]


def dataset(seed: int, count: int, size) -> Iterator[Sample]:
    """(image, caption, depth, edges) for `count` scenes; use HELD_OUT_SEED only for evaluation."""
    for scene in scenes(seed, count):
        yield render(scene, size), caption(scene), depth_map(scene, size), edge_map(scene, size)
