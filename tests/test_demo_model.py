"""What the trained demo model (checkpoints/demo) paints, checked through the real servers on
held-out generated scenes (training/scenes.py, HELD_OUT_SEED), each against a baseline.

Random weights cannot pass any of these: they are what the training bought."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from qwen2vl_flux.client import Client
from qwen2vl_flux.client.cli import DEMO_INPUT, demo_model_dir
from qwen2vl_flux.client.launch import ServerProcess
from qwen2vl_flux.training import scenes

SIZE = 128       # the training resolution
STEPS = 20
PALETTE = np.array(list(scenes.PALETTE.values()), dtype=np.float32)
RED, GREEN = (np.array(scenes.PALETTE[c], dtype=np.float32) for c in ("red", "green"))


@pytest.fixture(scope="module")
def client():
    servers = [ServerProcess(role, demo_model_dir()).start() for role in ("encoder", "generator")]
    try:
        for server in servers:
            server.wait_serving()
        with Client(servers[0].address, servers[1].address, timeout=300) as c:
            yield c
    finally:
        for server in servers:
            server.stop()


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
    in some channel: the same 2-pixel convention as scenes.edge_map."""
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


def test_demo_input_is_the_first_held_out_scene():
    with Image.open(DEMO_INPUT) as shipped:
        expected = scenes.render(next(scenes.scenes(scenes.HELD_OUT_SEED, 1)), SIZE)
        assert np.array_equal(pixels(shipped), pixels(expected))


def test_variation_is_nearest_to_its_own_input(client):
    """>= 80 % of 20 outputs are nearer (palette histogram, L1) to their own input than to
    any of the 19 others; chance is 1 in 20."""
    inputs = [scenes.render(s, SIZE) for s in held_out(20)]
    wanted = [palette_histogram(im) for im in inputs]
    hits = []
    for i, image in enumerate(inputs):
        out = client.variation(image, seed=i, steps=STEPS, width=SIZE, height=SIZE).images[0]
        distances = np.abs(palette_histogram(out)[None] - np.stack(wanted)).sum(1)
        hits.append(int(np.argmin(distances)) == i)
    assert sum(hits) >= 16, f"{sum(hits)} of 20 nearest to their own input (chance: 1): {hits}"


def _without_red_or_green(scene: scenes.Scene) -> bool:
    used = set(scene.colours) | {s.colour for s in scene.shapes}
    return not used & {"red", "green"}


def test_prompt_colour_moves_the_shape_colour(client):
    """Same input, the caption naming its first shape "green" vs "red": the shape's visible
    area comes out greener with "green" than with "red" in >= 80 % of 10 cases."""
    results = []
    for i, scene in enumerate(held_out(10, _without_red_or_green)):
        image, region = scenes.render(scene, SIZE), scenes.labels(scene, SIZE) == 0
        greenness = {}
        for colour in ("green", "red"):
            named = replace(scene, shapes=(replace(scene.shapes[0], colour=colour),) + scene.shapes[1:])
            out = client.variation(image, prompt=scenes.caption(named), seed=i, steps=STEPS,
                                   width=SIZE, height=SIZE).images[0]
            area = pixels(out)[region]
            greenness[colour] = float(np.mean(np.linalg.norm(area - RED, axis=1) - np.linalg.norm(area - GREEN, axis=1)))
        results.append(greenness)
    moved = sum(r["green"] > r["red"] for r in results)
    assert moved >= 8, f"{moved} of 10 moved the named way: {results}"


def test_inpaint_restores_a_shape_better_than_a_mean_fill(client):
    """A shape's silhouette mean-filled (the baseline) and masked, the caption as prompt:
    inside the mask the output is nearer the true pixels than the fill in >= 80 % of 10
    cases and on average; outside it stays near the input."""
    inside_out, inside_fill, outside = [], [], []
    for i, scene in enumerate(held_out(10)):
        truth = scenes.render(scene, SIZE)
        mask = scenes.mask_for(scene, len(scene.shapes) - 1, SIZE)
        hole = scenes.mean_fill(truth, mask)
        out = client.inpaint(hole, mask=mask, prompt=scenes.caption(scene), seed=i, steps=STEPS).images[0]
        assert out.size == (SIZE, SIZE)
        inside = np.asarray(mask) > 127
        inside_out.append(float(np.abs(pixels(out) - pixels(truth))[inside].mean()))
        inside_fill.append(float(np.abs(pixels(hole) - pixels(truth))[inside].mean()))
        outside.append(float(np.abs(pixels(out) - pixels(hole))[~inside].mean()))
    better = sum(o < f for o, f in zip(inside_out, inside_fill))
    assert better >= 8 and np.mean(inside_out) < np.mean(inside_fill), (inside_out, inside_fill)
    assert np.mean(outside) < 0.5 * np.mean(inside_fill), (outside, inside_fill)


def test_controlnet_edges_follow_the_given_edge_map(client):
    """Edge maps (and depth maps) of scene S given to the ControlNet, another scene as image a:
    the output's edges match S's edge map (F1) well above img2img from the same image a."""
    chosen = held_out(11)
    with_cn, without = [], []
    for i, (scene, other) in enumerate(zip(chosen, chosen[1:])):
        a = scenes.render(other, SIZE)
        truth = np.asarray(scenes.edge_map(scene, SIZE)) > 127
        maps = {"depth": scenes.depth_map(scene, SIZE).convert("RGB"),
                "line": scenes.edge_map(scene, SIZE).convert("RGB")}
        out = client.controlnet(a, control_maps=maps, seed=i, steps=STEPS).images[0]
        plain = client.img2img(a, seed=i, steps=STEPS).images[0]
        with_cn.append(edge_f1(colour_edges(out), truth))
        without.append(edge_f1(colour_edges(plain), truth))
    assert np.mean(with_cn) >= np.mean(without) + 0.15, (with_cn, without)
    assert sum(c > w for c, w in zip(with_cn, without)) >= 8, (with_cn, without)
