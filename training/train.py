"""Train a tiny Qwen2VL-Flux on generated scenes (issue 8), in the published checkpoint layout.

    python -m qwen2vl_flux.training.train --out DIR [--device cuda] [--minutes M] [--size 64]
        [--steps-vae N --steps-flux N --steps-controlnet N] [--scenes N] [--seed S]

The tiny preset (`make_tiny_checkpoints`) is written first, so every file the servers need
exists; the stages below then overwrite the weights they train, with `save_pretrained`, so
the servers load the result unchanged. Stages:

1. VAE: reconstruction (MSE + L1) and a small KL on the scene images; shift/scale factors
   re-measured on the trained latents (as FLUX's were) and written to its config.
2. Encodings: the project's own `Qwen2VLFluxEncoder` (frozen random Qwen2-VL, T5, CLIP, and the
   preset's connector and t5_embedder) gives, per scene, the connector tokens of the image and,
   for half of the scenes, the T5 tokens of its caption (pixel budget as at serving time).
3. FLUX transformer + its context_embedder: rectified flow matching on packed VAE latents,
   called exactly as `FluxGenerator.denoise` calls it.
4. Union ControlNet (+ its context_embedder), transformer frozen, on depth (mode 2) and edge
   (mode 0) maps at the serving strengths, VAE-encoded as the generator encodes them.

Every stage is seeded from --seed; a --minutes budget may end a stage early (then the step
count, and so the result, depends on the machine's speed). Losses go to DIR/training_log.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen2vl_flux.checkpoints import CheckpointLayout
from qwen2vl_flux.client.modes import CONTROL_MODE_DEPTH, CONTROL_MODE_LINE, DEFAULTS

from . import scenes

GUIDANCE = 3.5  # the serving default; the transformer is guidance-distilled in form
PROMPT_BUDGET, IMAGE_ONLY_BUDGET = 256 * 28 * 28, 512 * 28 * 28  # Qwen pixel budgets (MODEL_NOTES)
# (kind, union mode, scale): the maps and strengths the generator uses when none are asked for.
CONTROLS = {"depth": (CONTROL_MODE_DEPTH, DEFAULTS["depth_strength"]),
            "line": (CONTROL_MODE_LINE, DEFAULTS["line_strength"])}
CONTROL_CHOICES = (("depth",), ("line",), ("depth", "line"))
STAGE_SHARES = {"vae": 0.2, "flux": 0.55, "controlnet": 0.25}  # of the --minutes budget


# ---------------------------------------------------------------- bookkeeping

class Log:
    """JSON lines: {"stage", "step", "loss", "seconds"} (seconds since the stage began)."""

    def __init__(self, path: Path):
        self.path = path
        path.write_text("")

    def write(self, **record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class Budget:
    """An optional wall-clock budget, shared out over the remaining training stages."""

    def __init__(self, minutes: float | None):
        self.end = time.perf_counter() + minutes * 60 if minutes else None

    def stage_deadline(self, stage: str) -> float | None:
        if self.end is None:
            return None
        stages = list(STAGE_SHARES)
        rest = sum(STAGE_SHARES[s] for s in stages[stages.index(stage):])
        now = time.perf_counter()
        return now + max(0.0, self.end - now) * STAGE_SHARES[stage] / rest


def run_steps(stage: str, steps: int, loss_fn, params, log: Log, deadline: float | None, lr: float) -> int:
    """AdamW with cosine decay and gradient clipping; returns the number of steps done."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    start = time.perf_counter()
    done = 0
    for step in range(steps):
        if deadline is not None and time.perf_counter() > deadline:
            break
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        done = step + 1
        log.write(stage=stage, step=step, loss=float(loss.detach()), seconds=round(time.perf_counter() - start, 4))
    return done


def _pixels(images, device) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1], as VaeImageProcessor normalises them."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor().preprocess(images).to(device)


# ---------------------------------------------------------------- 1. VAE

def train_vae(layout: CheckpointLayout, images, steps: int, batch: int, device, seed: int, log: Log,
              deadline: float | None, kl_weight: float = 1e-6) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(layout.vae).to(device).train()
    data = _pixels(images, device)
    rng = torch.Generator().manual_seed(seed)

    def loss_fn(step):
        x = data[torch.randint(len(data), (min(batch, len(data)),), generator=rng)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        return F.mse_loss(recon, x) + F.l1_loss(recon, x) + kl_weight * kl

    run_steps("vae", steps, loss_fn, vae.parameters(), log, deadline, lr=1e-3)

    # Latent statistics -> shift_factor / scaling_factor, as FLUX's VAE config carries them; measured
    # on samples, since the generator encodes with latent_dist.sample: its latents get unit variance.
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(data[i:i + 64]).latent_dist.sample(rng) for i in range(0, len(data), 64)])
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))
    vae.to("cpu").save_pretrained(layout.vae)


# ---------------------------------------------------------------- 2. encodings

@dataclass
class Encoded:
    qwen: torch.Tensor           # (1, N, joint_attention_dim): connector output of the image
    prompt: torch.Tensor | None  # (1, 256, inner_dim): t5_embedder output of the caption


def encode_scenes(layout: CheckpointLayout, samples, device, log: Log) -> tuple[list[Encoded], torch.Tensor]:
    """Conditioning exactly as at serving time: variation of the scene's own image, with its
    caption as the prompt for every other scene (budget 256*28*28) and none otherwise (512*28*28)."""
    from qwen2vl_flux.encoder_server.model import Qwen2VLFluxEncoder

    start = time.perf_counter()
    encoder = Qwen2VLFluxEncoder(layout.root, device=device)
    encoded = []
    for i, (image, caption, _, _) in enumerate(samples):
        prompt = caption if i % 2 == 0 else None
        parts, prompt_tokens = encoder.encode_parts(
            [("a", image, None)], prompt, PROMPT_BUDGET if prompt else IMAGE_ONLY_BUDGET)
        # clone() outside inference mode: inference tensors cannot take part in autograd.
        encoded.append(Encoded(parts[0].tokens.clone(), None if prompt_tokens is None else prompt_tokens.clone()))
    pooled = encoder.pooled.clone()
    log.write(stage="encode", step=len(encoded), loss=None, seconds=round(time.perf_counter() - start, 4))
    del encoder
    return encoded, pooled


def _groups(encoded: list[Encoded]) -> list[list[int]]:
    """Scenes whose text streams have the same shape, so they batch without padding."""
    groups: dict[tuple, list[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault((e.qwen.shape[1], e.prompt is None), []).append(i)
    return list(groups.values())


class Batches:
    """Seeded batches of scene indices drawn from one shape group at a time."""

    def __init__(self, encoded: list[Encoded], batch: int, seed: int):
        self.groups = _groups(encoded)
        self.weights = torch.tensor([len(g) for g in self.groups], dtype=torch.float)
        self.batch, self.rng = batch, torch.Generator().manual_seed(seed)

    def __call__(self) -> list[int]:
        group = self.groups[int(torch.multinomial(self.weights, 1, generator=self.rng))]
        picks = torch.randint(len(group), (min(self.batch, len(group)),), generator=self.rng)
        return [group[int(i)] for i in picks]


def _text_stream(embedder, encoded: list[Encoded], idx: list[int]) -> torch.Tensor:
    """cat[context_embedder(qwen), t5 tokens], as FluxGenerator._text_streams builds it."""
    parts = [embedder(torch.cat([encoded[i].qwen for i in idx]))]
    if encoded[idx[0]].prompt is not None:
        parts.append(torch.cat([encoded[i].prompt for i in idx]))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def _latents(gen, images, size: int, seed: int) -> torch.Tensor:
    """Packed VAE latents, made as the generator makes them (`_encode_image`: preprocess,
    latent_dist.sample, shift and scale; then `_pack`)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.cat([gen._pack(gen._encode_image(im, size, size, generator, 1)) for im in images])


def _flow_sample(x0: torch.Tensor, rng: torch.Generator):
    """t ~ sigmoid(N(0, 1)); x_t = (1 - t) x0 + t noise; target v = noise - x0."""
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=rng)).to(x0.device)
    noise = torch.randn(x0.shape, generator=rng).to(x0.device)
    tt = t.view(-1, 1, 1)
    return t, (1 - tt) * x0 + tt * noise, noise - x0


def _sampler(gen, latents: torch.Tensor, encoded: list[Encoded], size: int, batch: int, seed: int):
    """Per step: a batch of scene indices and its flow-matching sample, plus the fixed img_ids."""
    latent_side = 2 * (size // (gen.vae_scale_factor * 2))
    image_ids = gen._image_ids(latent_side, latent_side)
    batches, rng = Batches(encoded, batch, seed), torch.Generator().manual_seed(seed + 1)

    def sample():
        idx = batches()
        return (idx, *_flow_sample(latents[idx], rng))

    return sample, image_ids


def _save_with_embedder(model, embedder, path: Path) -> None:
    """The published layout keeps context_embedder inside the model: put it back to save."""
    model.context_embedder = embedder
    model.save_pretrained(path)
    model.context_embedder = torch.nn.Identity()


# ---------------------------------------------------------------- 3. FLUX transformer

def train_flux(gen, latents: torch.Tensor, encoded: list[Encoded], pooled: torch.Tensor, size: int,
               steps: int, batch: int, seed: int, log: Log, deadline: float | None) -> None:
    torch.manual_seed(seed)
    transformer, embedder, device = gen.transformer.train(), gen.context_embedder.train(), gen.device
    sample, image_ids = _sampler(gen, latents, encoded, size, batch, seed)

    def loss_fn(step):
        idx, t, x_t, target = sample()
        text = _text_stream(embedder, encoded, idx)
        pred = transformer(
            hidden_states=x_t, timestep=t, guidance=torch.full([len(idx)], GUIDANCE, device=device),
            pooled_projections=pooled.expand(len(idx), -1), encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=device), img_ids=image_ids, return_dict=False)[0]
        return F.mse_loss(pred, target)

    run_steps("flux", steps, loss_fn, list(transformer.parameters()) + list(embedder.parameters()),
              log, deadline, lr=5e-4)
    transformer.eval(), embedder.eval()


# ---------------------------------------------------------------- 4. ControlNet

def init_controlnet_from_transformer(gen) -> None:
    """Standard ControlNet start (diffusers' `from_transformer`): the trained transformer's
    embedders and first blocks, zeroed output projections so it starts by changing nothing."""
    controlnet, transformer = gen.controlnet, gen.transformer
    for name in ("pos_embed", "time_text_embed", "x_embedder"):
        getattr(controlnet, name).load_state_dict(getattr(transformer, name).state_dict())
    gen.controlnet_context_embedder.load_state_dict(gen.context_embedder.state_dict())
    for mine, theirs in ((controlnet.transformer_blocks, transformer.transformer_blocks),
                         (controlnet.single_transformer_blocks, transformer.single_transformer_blocks)):
        for a, b in zip(mine, theirs):
            a.load_state_dict(b.state_dict())
    for module in [controlnet.controlnet_x_embedder, *controlnet.controlnet_blocks,
                   *controlnet.controlnet_single_blocks]:
        torch.nn.init.zeros_(module.weight)
        torch.nn.init.zeros_(module.bias)


def train_controlnet(gen, latents: torch.Tensor, controls: dict[str, torch.Tensor], encoded: list[Encoded],
                     pooled: torch.Tensor, size: int, steps: int, batch: int, seed: int, log: Log,
                     deadline: float | None) -> None:
    torch.manual_seed(seed)
    controlnet, embedder, device = gen.controlnet.train(), gen.controlnet_context_embedder.train(), gen.device
    gen.transformer.requires_grad_(False)
    gen.context_embedder.requires_grad_(False)
    sample, image_ids = _sampler(gen, latents, encoded, size, batch, seed)

    def loss_fn(step):
        idx, t, x_t, target = sample()
        n = len(idx)
        guidance = torch.full([n], GUIDANCE, device=device)
        text = _text_stream(gen.context_embedder, encoded, idx)
        control_text = _text_stream(embedder, encoded, idx)
        txt_ids = torch.zeros(text.shape[1], 3, device=device)
        blocks = singles = None
        for kind in CONTROL_CHOICES[step % len(CONTROL_CHOICES)]:   # depth, line, both (summed)
            union_mode, scale = CONTROLS[kind]
            b, s = controlnet(
                hidden_states=x_t, controlnet_cond=controls[kind][idx],
                controlnet_mode=torch.full((n, 1), union_mode, device=device, dtype=torch.long),
                conditioning_scale=scale, timestep=t, guidance=guidance, pooled_projections=pooled.expand(n, -1),
                encoder_hidden_states=control_text, txt_ids=txt_ids, img_ids=image_ids, return_dict=False)
            blocks = b if blocks is None else [x + y for x, y in zip(blocks, b)]
            singles = s if singles is None else [x + y for x, y in zip(singles, s)]
        pred = gen.transformer(
            hidden_states=x_t, timestep=t, guidance=guidance, pooled_projections=pooled.expand(n, -1),
            encoder_hidden_states=text, txt_ids=txt_ids, img_ids=image_ids,
            controlnet_block_samples=blocks, controlnet_single_block_samples=singles, return_dict=False)[0]
        return F.mse_loss(pred, target)

    run_steps("controlnet", steps, loss_fn, list(controlnet.parameters()) + list(embedder.parameters()),
              log, deadline, lr=5e-4)
    controlnet.eval(), embedder.eval()


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qwen2vl_flux.training.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write (published layout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget for the three training stages")
    p.add_argument("--size", type=int, default=64, help="training resolution (square, multiple of 16)")
    p.add_argument("--scenes", type=int, default=1024, help="training scenes (scenes.TRAIN_SEED)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps-vae", type=int, default=3000)
    p.add_argument("--steps-flux", type=int, default=6000)
    p.add_argument("--steps-controlnet", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> Path:
    from qwen2vl_flux.checkpoints.tiny import make_tiny_checkpoints
    from qwen2vl_flux.generator_server.pipeline import FluxGenerator

    args = parse_args(argv)
    if args.size % 16:
        raise SystemExit("--size must be a multiple of 16 (the generator floors sizes to 16)")
    started = time.perf_counter()
    layout = CheckpointLayout(make_tiny_checkpoints(args.out))
    log, budget, device = Log(layout.root / "training_log.jsonl"), Budget(args.minutes), torch.device(args.device)
    samples = list(scenes.dataset(scenes.TRAIN_SEED, args.scenes, args.size))
    images = [s[0] for s in samples]

    train_vae(layout, images, args.steps_vae, args.batch, device, args.seed, log, budget.stage_deadline("vae"))
    encoded, pooled = encode_scenes(layout, samples, device, log)

    gen = FluxGenerator(layout.root, device=args.device)   # loads the trained VAE
    gen.vae.requires_grad_(False)
    latents = _latents(gen, images, args.size, args.seed)
    train_flux(gen, latents, encoded, pooled, args.size, args.steps_flux, args.batch, args.seed + 1, log,
               budget.stage_deadline("flux"))
    _save_with_embedder(gen.transformer, gen.context_embedder, layout.transformer)

    controls = {kind: _latents(gen, [m.convert("RGB") for m in maps], args.size, args.seed + 2)
                for kind, maps in (("depth", [s[2] for s in samples]), ("line", [s[3] for s in samples]))}
    init_controlnet_from_transformer(gen)
    train_controlnet(gen, latents, controls, encoded, pooled, args.size, args.steps_controlnet, args.batch,
                     args.seed + 3, log, budget.stage_deadline("controlnet"))
    _save_with_embedder(gen.controlnet, gen.controlnet_context_embedder, layout.controlnet)

    total = sum(f.stat().st_size for f in layout.root.rglob("*") if f.is_file())
    print(json.dumps({"out": str(layout.root), "bytes": total, "seconds": round(time.perf_counter() - started, 1)}))
    return layout.root


if __name__ == "__main__":
    main()
