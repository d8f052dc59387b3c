"""The scene generator is the ground truth of issue 8's semantic tests: it must be exact and
reproducible, and its captions, depth, edges and masks must agree with the pixels it draws."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

try:
    from qwen2vl_flux.training import scenes
except ImportError:  # package mapping not installed yet: import from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from training import scenes

Shape, Scene = scenes.Shape, scenes.Scene


def _arrays(seed, count, size):
    return [tuple(np.asarray(x) if not isinstance(x, str) else x for x in item)
            for item in scenes.dataset(seed, count, size)]


def _centre_px(s, size):
    return int(s.cy * size), int(s.cx * size)  # (row, col) of the pixel holding the centre


def test_deterministic_per_seed():
    a, b = _arrays(7, 10, 48), _arrays(7, 10, 48)
    for x, y in zip(a, b):
        assert x[1] == y[1]
        for u, v in zip(x[:1] + x[2:], y[:1] + y[2:]):
            np.testing.assert_array_equal(u, v)


def test_different_seeds_differ():
    train = [s for s in scenes.scenes(scenes.TRAIN_SEED, 50)]
    held = [s for s in scenes.scenes(scenes.HELD_OUT_SEED, 50)]
    assert not set(train) & set(held)
    assert len({scenes.caption(s) for s in train}) > 40
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(_arrays(1, 5, 32), _arrays(2, 5, 32)))


@pytest.mark.parametrize("size", [32, 64, 128, (96, 64)])
def test_sizes_and_modes(size):
    w, h = (size, size) if isinstance(size, int) else size
    image, _, depth, edges = next(scenes.dataset(3, 1, size))
    assert (image.size, image.mode) == ((w, h), "RGB")
    assert (depth.size, depth.mode) == ((w, h), "L")
    assert (edges.size, edges.mode) == ((w, h), "L")
    mask = scenes.mask_for(scenes.sample_scene(np.random.default_rng(0)), 0, size)
    assert (mask.size, mask.mode) == ((w, h), "L")


def test_scene_variety():
    sample = list(scenes.scenes(11, 200))
    assert {s.background for s in sample} == set(scenes.BACKGROUNDS)
    assert {len(s.shapes) for s in sample} == {1, 2, 3}
    assert {sh.kind for s in sample for sh in s.shapes} == set(scenes.KINDS)
    assert {sh.colour for s in sample for sh in s.shapes} == set(scenes.COLOURS)


def test_caption_names_what_is_drawn():
    size, checked, total = 96, 0, 0
    for scene in scenes.scenes(5, 100):
        text = scenes.caption(scene)
        image, lab = np.asarray(scenes.render(scene, size)), scenes.labels(scene, size)
        for i, s in enumerate(scene.shapes):
            assert f"{s.colour} {s.kind}" in text
            row, col = _centre_px(s, size)
            total += 1
            if lab[row, col] != i:  # occluded centre pixel: nothing to compare
                continue
            checked += 1
            assert tuple(image[row, col]) == scenes.PALETTE[s.colour]
            assert s.colour not in scene.colours  # never the background's colour
        for colour in scene.colours:
            assert colour in text.split(" on ")[1]
    assert checked == total  # the sampler keeps a patch around every centre uncovered
    one = Scene("solid", ("green",), False, 4, (Shape("circle", "red", .3, .5, .2, .5),
                                                Shape("square", "blue", .7, .5, .2, .7)))
    assert scenes.caption(one) == "a red circle and a blue square on a green background"
    tri = Shape("triangle", "orange", .5, .2, .1, .9)
    three = Scene("stripes", ("orange", "white"), True, 5, one.shapes + (tri,))
    assert scenes.caption(three) == ("a red circle, a blue square and an orange triangle"
                                     " on an orange and white striped background")


def test_backgrounds_render_their_colours():
    p = scenes.PALETTE
    solid = np.asarray(scenes.render(Scene("solid", ("yellow",), False, 4, ()), 16))
    assert (solid == p["yellow"]).all()
    stripes = np.asarray(scenes.render(Scene("stripes", ("red", "blue"), False, 4, ()), 16))
    assert tuple(stripes[0, 0]) == p["red"] and tuple(stripes[0, 4]) == p["blue"]
    grad = np.asarray(scenes.render(Scene("gradient", ("black", "white"), True, 4, ()), 64))
    assert (np.diff(grad[:, 0, 0].astype(int)) >= 0).all() and (grad[0] == grad[0, 0]).all()


def test_depth_orders_and_occludes():
    back = Shape("square", "red", .4, .5, .2, .5)
    front = Shape("circle", "blue", .6, .5, .2, .9)
    scene = Scene("solid", ("white",), False, 4, (back, front))
    d = np.asarray(scenes.depth_map(scene, 100)).astype(int)
    bg, b, f, overlap = d[5, 5], d[50, 25], d[50, 75], d[50, 50]
    assert bg < b < f
    assert overlap == f  # the front shape's depth wins where both cover the pixel
    assert bg == round(scenes.BACKGROUND_DEPTH * 255)
    for scene in scenes.scenes(9, 30):  # background is always the darkest
        d = np.asarray(scenes.depth_map(scene, 64))
        lab = scenes.labels(scene, 64)
        assert (d[lab >= 0] > d[lab < 0].max(initial=0)).all()


def test_edges_only_at_boundaries():
    size, s = 100, Shape("circle", "red", .5, .5, .25, .8)
    backgrounds = (("solid", ("blue",)), ("stripes", ("blue", "white")),
                   ("gradient", ("black", "white")))
    for kind, colours in backgrounds:
        e = np.asarray(scenes.edge_map(Scene(kind, colours, False, 6, (s,)), size)) > 0
        rows, cols = np.nonzero(e)
        assert len(rows) > 0
        dist = np.hypot((cols + .5) / size - .5, (rows + .5) / size - .5) * size
        assert (np.abs(dist - 25) <= 2).all()  # within 2 px of the circle's outline
    for scene in scenes.scenes(4, 20):  # every visible boundary is marked, nothing else
        lab, e = scenes.labels(scene, 64), np.asarray(scenes.edge_map(scene, 64)) > 0
        pad = np.pad(lab, 1, mode="edge")
        near = np.zeros_like(e)
        for dr, dc in ((0, 1), (2, 1), (1, 0), (1, 2)):
            near |= pad[dr:dr + 64, dc:dc + 64] != lab
        np.testing.assert_array_equal(e, near)
        assert e.mean() < 0.25


def test_masks_cover_the_right_pixels():
    square = Shape("square", "red", .5, .5, .25, .5)
    tri = Shape("triangle", "green", .75, .5, .2, .9)
    scene = Scene("solid", ("blue",), False, 4, (square, tri))
    m = np.asarray(scenes.mask_for(scene, 0, 64)) > 0
    assert m.sum() == 32 * 32 and m[16:48, 16:48].all()  # pixel centres in [0.25, 0.75]
    image = np.asarray(scenes.render(scene, 64))
    seen = np.asarray(scenes.mask_for(scene, 0, 64, visible=True)) > 0
    assert seen.sum() < m.sum() and not (seen & ~m).any()
    assert (image[seen] == scenes.PALETTE["red"]).all()
    t = np.asarray(scenes.mask_for(scene, 1, 64)) > 0
    assert (image[t] == scenes.PALETTE["green"]).all()
    assert (image[~(t | m)] == scenes.PALETTE["blue"]).all()
    rows = t.sum(axis=1)
    assert (np.diff(rows[rows > 0]) >= 0).all()  # the triangle widens from apex to base


def test_dataset_is_fast():
    import time

    start = time.perf_counter()
    list(scenes.dataset(0, 200, 64))
    assert time.perf_counter() - start < 2.0
