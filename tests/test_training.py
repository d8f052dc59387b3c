"""The training script end to end on CPU, in a few steps per stage: log, layout, loading, size."""
from __future__ import annotations

import json
import math

import pytest

from qwen2vl_flux.training import scenes, train

STEPS = {"vae": 8, "flux": 6, "controlnet": 6}
SIZE = 32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train.main(["--out", str(out), "--size", str(SIZE), "--scenes", "8", "--batch", "4", "--seed", "0",
                "--steps-vae", str(STEPS["vae"]), "--steps-flux", str(STEPS["flux"]),
                "--steps-controlnet", str(STEPS["controlnet"])])
    return out


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]


def test_log_has_a_finite_loss_for_every_step_of_every_stage(trained):
    records = _log(trained)
    for stage, steps in STEPS.items():
        rows = [r for r in records if r["stage"] == stage]
        assert [r["step"] for r in rows] == list(range(steps))
        assert all(math.isfinite(r["loss"]) and r["loss"] >= 0 for r in rows)
        assert all(r["seconds"] >= 0 for r in rows)
        # decreasing-ish: the later half is not worse than the first half (no divergence)
        first, last = [r["loss"] for r in rows[: steps // 2]], [r["loss"] for r in rows[steps // 2:]]
        assert sum(last) / len(last) <= 1.25 * sum(first) / len(first), (stage, first, last)
    vae = [r["loss"] for r in records if r["stage"] == "vae"]
    assert min(vae[-3:]) < vae[0]  # reconstruction does improve within a few steps
    encode = [r for r in records if r["stage"] == "encode"]
    assert encode and encode[0]["step"] == 8


def test_checkpoint_loads_in_the_servers_and_generates_a_variation(trained):
    from qwen2vl_flux.client.modes import Mode, resolve_parameters
    from qwen2vl_flux.encoder_server.model import Qwen2VLFluxEncoder
    from qwen2vl_flux.generator_server.pipeline import Conditioning, FluxGenerator, GenerationJob

    encoder = Qwen2VLFluxEncoder(trained)
    generator = FluxGenerator(trained)
    assert encoder.fingerprint.checkpoint_id == generator.fingerprint.checkpoint_id
    image, caption, _, _ = next(scenes.dataset(scenes.HELD_OUT_SEED, 1, SIZE))
    parts, prompt = encoder.encode_parts([("a", image, None)], caption, train.PROMPT_BUDGET)
    params, _ = resolve_parameters(Mode.VARIATION, {"seed": 1, "steps": 2, "width": SIZE, "height": SIZE})
    job = GenerationJob(Mode.VARIATION, params, Conditioning({"a": parts[0].tokens}, prompt, encoder.pooled))
    images = generator.generate(job)
    assert len(images) == 1 and images[0].size == (SIZE, SIZE)
    # the trained weights are the ones loaded (not the preset's)
    assert generator.vae.config.shift_factor != 0.1159
    assert generator.controlnet is not None


def test_checkpoint_is_at_most_40_mb(trained):
    total = sum(f.stat().st_size for f in trained.rglob("*") if f.is_file())
    assert total <= 40 * 1024 * 1024


def test_same_seed_reproduces_the_losses_and_the_weights(trained, tmp_path):
    from safetensors.torch import load_file

    again = tmp_path / "again"
    train.main(["--out", str(again), "--size", str(SIZE), "--scenes", "8", "--batch", "4", "--seed", "0",
                "--steps-vae", str(STEPS["vae"]), "--steps-flux", str(STEPS["flux"]),
                "--steps-controlnet", str(STEPS["controlnet"])])
    assert [(r["stage"], r["step"], r["loss"]) for r in _log(again)] == \
           [(r["stage"], r["step"], r["loss"]) for r in _log(trained)]
    for part in ("flux/vae", "flux/transformer", "controlnet"):
        a = load_file(trained / part / "diffusion_pytorch_model.safetensors")
        b = load_file(again / part / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), part


def test_conditioning_pictures_differ_from_the_scene_only_where_the_caption_corrects_them():
    np = pytest.importorskip("numpy")
    for i, scene in enumerate(scenes.scenes(scenes.TRAIN_SEED, 16)):
        image = scenes.render(scene, SIZE)
        picture, prompt = train.conditioning(scene, i, image)
        role = train.ROLES[i % len(train.ROLES)]
        assert (prompt is None) == (role == "no caption") and prompt in (None, scenes.caption(scene))
        changed = (np.asarray(picture) != np.asarray(image)).any(-1)
        if role in ("scene", "no caption"):
            assert picture is image
            continue
        assert changed.any(), (i, role)
        shapes = scenes.labels(scene, SIZE) >= 0
        # recolouring changes shape pixels only; a fill may spill over a nearer shape, never the background
        assert not (changed & ~shapes).any(), (i, role)


def test_flow_sample_lies_on_a_straight_path_from_the_noised_picture_to_the_scene():
    import torch

    x0, source = torch.randn(256, 4, 8, generator=torch.Generator().manual_seed(0)).chunk(2)
    t, x_t, v = train._flow_sample(x0, source, torch.Generator().manual_seed(1))
    tt = t.view(-1, 1, 1)
    torch.testing.assert_close(x_t - tt * v, x0, rtol=0, atol=1e-5)   # the velocity ends at the scene
    # the same draws with the scene as its own source: plain rectified flow
    t_same, x_same, v_same = train._flow_sample(x0, x0, torch.Generator().manual_seed(1))
    assert torch.equal(t_same, t)
    noise = (x_same - (1 - tt) * x0) / tt
    torch.testing.assert_close(v_same, noise - x0, rtol=0, atol=1e-4)
    # the picture's weight in x_t: positive, at most the (1 - t) a plain sample gives the scene
    weight = ((x_t - x_same) / (source - x0)).flatten(1)
    torch.testing.assert_close(weight.min(1).values, weight.max(1).values, rtol=0, atol=1e-3)
    w = weight.mean(1)
    assert (w > 0).all() and (w <= 1 - t + 1e-4).all()
    early = t < train.EDIT_START[0]   # after every possible start: part of the way to the scene
    assert early.any() and (w[early] < 1 - t[early]).all()
