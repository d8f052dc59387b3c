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
