"""What a trained model paints, measured through the real servers on held-out scenes
(scenes.HELD_OUT_SEED), each against a baseline. tests/test_demo_model.py asserts on these
numbers; this command prints them:

    python -m qwen2vl_flux.training.evaluate [--checkpoints DIR] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
from PIL import Image

from qwen2vl_flux.client import Client

from . import scenes

SIZE = 128       # the training resolution
STEPS = 20
PALETTE = np.array(list(scenes.PALETTE.values()), dtype=np.float32)
RED, GREEN = (np.array(scenes.PALETTE[c], dtype=np.float32) for c in ("red", "green"))


def held_out(count: int, keep=lambda scene: True) -> list[scenes.Scene]:
    found, stream = [], scenes.scenes(scenes.HELD_OUT_SEED, 10_000)
    while len(found) < count:
        scene = next(stream)
        if keep(scene):
            found.append(scene)
    return found


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def palette_histogram(image: Image.Image) -> np.ndarray:
    """Colour histogram over the scenes' palette: each pixel counts for its nearest colour."""
    p = pixels(image).reshape(-1, 1, 3)
    nearest = np.argmin(((p - PALETTE[None]) ** 2).sum(-1), axis=1)
    return np.bincount(nearest, minlength=len(PALETTE)) / len(nearest)


def colour_edges(image: Image.Image, threshold: float = 48.0) -> np.ndarray:
    """Both pixels of every neighbouring pair whose colours differ by more than `threshold`
    in some channel: the 2-pixel convention of scenes.edge_map."""
    p = pixels(image)
    dx = np.abs(p[:, 1:] - p[:, :-1]).max(-1) > threshold
    dy = np.abs(p[1:] - p[:-1]).max(-1) > threshold
    edge = np.zeros(p.shape[:2], dtype=bool)
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge[1:] |= dy
    edge[:-1] |= dy
    return edge


def _dilate(a: np.ndarray, r: int) -> np.ndarray:
    out = np.zeros_like(a)
    padded = np.pad(a, r)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy:dy + a.shape[0], dx:dx + a.shape[1]]
    return out


def edge_f1(predicted: np.ndarray, truth: np.ndarray, tolerance: int = 1) -> float:
    """F1 of edge pixels, each side matching within `tolerance` pixels."""
    if not predicted.any() or not truth.any():
        return 0.0
    precision = (predicted & _dilate(truth, tolerance)).sum() / predicted.sum()
    recall = (truth & _dilate(predicted, tolerance)).sum() / truth.sum()
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def variation(client: Client, count: int = 20, steps: int = STEPS) -> dict:
    """How many outputs are nearer (palette histogram, L1) to their own input than to any
    other input; chance is 1 of `count`."""
    inputs = [scenes.render(s, SIZE) for s in held_out(count)]
    wanted = np.stack([palette_histogram(im) for im in inputs])
    hits = []
    for i, image in enumerate(inputs):
        out = client.variation(image, seed=i, steps=steps, width=SIZE, height=SIZE).images[0]
        hits.append(int(np.argmin(np.abs(palette_histogram(out)[None] - wanted).sum(1))) == i)
    return {"nearest_own": sum(hits), "of": count, "chance": 1}


def _without_red_or_green(scene: scenes.Scene) -> bool:
    return not (set(scene.colours) | {s.colour for s in scene.shapes}) & {"red", "green"}


def prompt_colour(client: Client, count: int = 10, steps: int = STEPS) -> dict:
    """Same input, its caption with the first shape named "green" vs "red": greenness (mean
    distance to red minus distance to green) of that shape's visible area in each output."""
    cases = []
    for i, scene in enumerate(held_out(count, _without_red_or_green)):
        image, region = scenes.render(scene, SIZE), scenes.labels(scene, SIZE) == 0
        greenness = {}
        for colour in ("green", "red"):
            named = replace(scene, shapes=(replace(scene.shapes[0], colour=colour),) + scene.shapes[1:])
            out = client.variation(image, prompt=scenes.caption(named), seed=i, steps=steps,
                                   width=SIZE, height=SIZE).images[0]
            area = pixels(out)[region]
            greenness[colour] = float(np.mean(np.linalg.norm(area - RED, axis=1) -
                                              np.linalg.norm(area - GREEN, axis=1)))
        cases.append(greenness)
    return {"moved": sum(c["green"] > c["red"] for c in cases), "of": count, "greenness": cases}


def inpaint(client: Client, count: int = 10, steps: int = STEPS) -> dict:
    """The front shape's silhouette mean-filled (the baseline) and masked, the caption as the
    prompt: mean absolute error to the true pixels inside the mask, output vs fill, and the
    output's change outside the mask."""
    inside_out, inside_fill, outside = [], [], []
    for i, scene in enumerate(held_out(count)):
        truth = scenes.render(scene, SIZE)
        mask = scenes.mask_for(scene, len(scene.shapes) - 1, SIZE)
        hole = scenes.mean_fill(truth, mask)
        out = client.inpaint(hole, mask=mask, prompt=scenes.caption(scene), seed=i, steps=steps).images[0]
        inside = np.asarray(mask) > 127
        inside_out.append(float(np.abs(pixels(out) - pixels(truth))[inside].mean()))
        inside_fill.append(float(np.abs(pixels(hole) - pixels(truth))[inside].mean()))
        outside.append(float(np.abs(pixels(out) - pixels(hole))[~inside].mean()))
    return {"better": sum(o < f for o, f in zip(inside_out, inside_fill)), "of": count,
            "inside_output": inside_out, "inside_fill": inside_fill, "outside": outside}


def controlnet(client: Client, count: int = 10, steps: int = STEPS) -> dict:
    """Depth and edge maps of scene S to the ControlNet, another scene as image a: edge F1 of
    the output against S's edge map, with the ControlNet and without (img2img of the same a)."""
    chosen = held_out(count + 1)
    with_cn, without = [], []
    for i, (scene, other) in enumerate(zip(chosen, chosen[1:])):
        a = scenes.render(other, SIZE)
        truth = np.asarray(scenes.edge_map(scene, SIZE)) > 127
        maps = {"depth": scenes.depth_map(scene, SIZE).convert("RGB"),
                "line": scenes.edge_map(scene, SIZE).convert("RGB")}
        out = client.controlnet(a, control_maps=maps, seed=i, steps=steps).images[0]
        plain = client.img2img(a, seed=i, steps=steps).images[0]
        with_cn.append(edge_f1(colour_edges(out), truth))
        without.append(edge_f1(colour_edges(plain), truth))
    return {"higher": sum(c > w for c, w in zip(with_cn, without)), "of": count,
            "f1_with": with_cn, "f1_without": without}


def main(argv=None) -> None:
    from qwen2vl_flux.client.cli import demo_model_dir
    from qwen2vl_flux.client.launch import serving_pair

    p = argparse.ArgumentParser(prog="python -m qwen2vl_flux.training.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", default=None, help="default: the demo model in the package")
    p.add_argument("--steps", type=int, default=STEPS)
    args = p.parse_args(argv)
    with serving_pair(args.checkpoints or demo_model_dir()) as (encoder, generator), \
            Client(encoder.address, generator.address, timeout=300) as client:
        for name, measure in (("variation", variation), ("prompt", prompt_colour), ("inpaint", inpaint),
                              ("controlnet", controlnet)):
            print(json.dumps({name: measure(client, steps=args.steps)}), flush=True)


if __name__ == "__main__":
    main()
