"""Train a tiny Qwen2VL-Flux on generated scenes (issue 8), in the published checkpoint layout.

    python -m qwen2vl_flux.training.train --out DIR [--device cuda] [--minutes M] [--size 128]
        [--steps-vae N --steps-flux N --steps-controlnet N] [--scenes N] [--seed S] [--preset demo]

A preset (`make_tiny_checkpoints` with `demo_preset()`: Qwen2-VL, T5 and CLIP tiny, FLUX 3x64 wide with
2 + 4 blocks, ControlNet 2 + 4 (a full copy), VAE 32-64 channels) is written first, so every file the servers
need exists; the stages below then overwrite the weights they train, with `save_pretrained`, so
the servers load the result unchanged. Stages:

1. VAE: reconstruction (MSE + L1) and a small KL on the scene images and, since the generator
   VAE-encodes the control maps too, on depth and edge maps (a third of the data); shift/scale
   factors re-measured on the trained latents of the scenes (as FLUX's were) and written to its config.
2. Encodings: the project's own `Qwen2VLFluxEncoder` (frozen random Qwen2-VL, T5, CLIP, and the
   preset's connector and t5_embedder) gives, per scene, the connector tokens of a picture and,
   for three scenes in four, the T5 tokens of its caption (pixel budgets as at serving time).
   The picture is the scene, or (with a caption) the scene with some shapes recoloured or one
   shape's area mean-filled, while the target stays the scene: the prompt carries what the
   picture lacks, which is what prompts and inpainting ask of it.
3. FLUX transformer + its context_embedder: rectified flow matching on packed VAE latents,
   called exactly as `FluxGenerator.denoise` calls it. Serving starts img2img and inpaint from
   the input picture noised to t0 (strength 0.8: t0 ~ 0.87 after the shift), so samples lie on
   the straight path from the noised conditioning picture at a random t0 to the scene: the
   model learns to correct what it is started from (for an unchanged picture, plain flow matching).
4. Union ControlNet (+ its context_embedder), transformer frozen, on depth (mode 2) and edge
   (mode 0) maps at the serving strengths, VAE-encoded as the generator encodes them, without
   a prompt (as the ControlNet check asks). For three steps in four the picture tokens are
   another scene's, and the path starts from that scene noised (as the corrected controlnet
   mode starts from the input picture): the layout has to come from the maps.

Training runs in fp32 (TF32 matmuls on CUDA): at these sizes the GPU waits on kernel launches,
not arithmetic, and bf16 autocast failed on an H200 (torch 2.11) in cuDNN attention's backward
in the ControlNet stage.

Every stage is seeded from --seed; a --minutes budget may end a stage early (then the step
count, and so the result, depends on the machine's speed). Losses go to DIR/training_log.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qwen2vl_flux.checkpoints import CheckpointLayout
from qwen2vl_flux.checkpoints.tiny import Preset
from qwen2vl_flux.client.modes import CONTROL_MODE_DEPTH, CONTROL_MODE_LINE, DEFAULTS

from . import scenes

# The demo model: what is trained is wide enough to learn the scenes; what stays frozen and
# random (Qwen2-VL, T5, CLIP, connector, t5_embedder) stays as tiny as the test preset. The T5
# tokenizer learns the scene vocabulary, so every colour and shape word is its own token.
def demo_preset() -> Preset:
    """Built on use: the tokenizer corpus (512 captions) takes a moment to sample."""
    return Preset(flux_heads=3, flux_head_dim=64, axes_dims_rope=(16, 24, 24), flux_layers=2,
                  flux_single_layers=4, controlnet_layers=2, controlnet_single_layers=4, t5_vocab=160,
                  vae_channels=(32, 64, 64, 64), vae_norm_groups=16,
                  corpus=tuple(scenes.caption(s) for s in scenes.scenes(scenes.TRAIN_SEED, 512)))


PRESETS = {"demo": demo_preset, "tiny": Preset}

GUIDANCE = 3.5  # the serving default; the transformer is guidance-distilled in form
PROMPT_BUDGET, IMAGE_ONLY_BUDGET = 256 * 28 * 28, 512 * 28 * 28  # Qwen pixel budgets (MODEL_NOTES)
# (kind, union mode, scale): the maps and strengths the generator uses when none are asked for.
CONTROLS = {"depth": (CONTROL_MODE_DEPTH, DEFAULTS["depth_strength"]),
            "line": (CONTROL_MODE_LINE, DEFAULTS["line_strength"])}
CONTROL_CHOICES = (("depth",), ("line",), ("depth", "line"))
STAGE_SHARES = {"vae": 0.1, "flux": 0.6, "controlnet": 0.3}  # of the --minutes budget
# What the encoder sees of training scene i, by i % len(ROLES): the scene with some shapes
# recoloured or one shape mean-filled (with the caption, which the target follows), the scene with
# its caption, or the scene alone (no prompt, as a plain variation).
ROLES = ("filled", "recoloured", "filled", "no caption", "scene", "recoloured", "filled", "no caption")
EDIT_START = (0.6, 1.0)  # t0, where a sample's path leaves the noised conditioning picture: uniform


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
    """AdamW, short warm-up, cosine decay over the steps or the stage's time, whichever runs out
    first (so a time-cut stage still anneals), gradient clipping; returns the steps done."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    start = time.perf_counter()
    span = None if deadline is None else max(deadline - start, 1e-6)
    warmup = min(100, steps // 10 + 1)
    done = 0
    for step in range(steps):
        elapsed = time.perf_counter() - start
        if span is not None and elapsed > span:
            break
        progress = max(step / steps, 0.0 if span is None else elapsed / span)
        factor = min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        done = step + 1
        # float() syncs once a step; at these sizes that costs less than it tells
        log.write(stage=stage, step=step, loss=float(loss.detach()), seconds=round(time.perf_counter() - start, 4))
    return done


def _pixels(images, device) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1], as VaeImageProcessor normalises them."""
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor().preprocess(images).to(device)


# ---------------------------------------------------------------- 1. VAE

def train_vae(layout: CheckpointLayout, images, maps, steps: int, batch: int, device, seed: int, log: Log,
              deadline: float | None, kl_weight: float = 1e-6) -> None:
    """`maps`: RGB control maps, trained on beside the scene `images`; the latent statistics
    come from the images alone."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(layout.vae).to(device).train()
    data = _pixels(images + maps, device)
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
        latents = torch.cat([vae.encode(data[i:min(i + 64, len(images))]).latent_dist.sample(rng)
                             for i in range(0, len(images), 64)])
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))
    vae.to("cpu").save_pretrained(layout.vae)


# ---------------------------------------------------------------- 2. encodings

@dataclass
class Encoded:
    qwen: torch.Tensor           # (1, N, joint_attention_dim): connector output of the picture
    prompt: torch.Tensor | None  # (1, 256, inner_dim): t5_embedder output of the caption


def conditioning(scene: scenes.Scene, index: int, image) -> tuple:
    """(picture, caption or None) the encoder sees for training scene `index`, by ROLES; the
    target is always the scene. `image` is the scene rendered; seeded by the index."""
    role = ROLES[index % len(ROLES)]
    if role == "no caption":
        return image, None
    prompt, rng = scenes.caption(scene), np.random.default_rng([scenes.TRAIN_SEED, index, 7])
    n = len(scene.shapes)
    if role == "recoloured":
        which = [i for i in range(n) if rng.random() < 0.5] or [int(rng.integers(n))]
        return scenes.render(scenes.recoloured(scene, rng, which), image.size), prompt
    if role == "filled":  # the front shape (as the inpaint check fills it) or any
        shape = n - 1 if rng.random() < 0.5 else int(rng.integers(n))
        return scenes.mean_fill(image, scenes.mask_for(scene, shape, image.size)), prompt
    return image, prompt


def encode_scenes(layout: CheckpointLayout, conditions, device, log: Log) -> tuple[list[Encoded], torch.Tensor]:
    """Conditioning exactly as at serving time: the connector tokens of each (picture, caption)
    and the caption's T5 tokens (budget 256*28*28 with a prompt, 512*28*28 without)."""
    from qwen2vl_flux.encoder_server.model import Qwen2VLFluxEncoder

    start = time.perf_counter()
    encoder = Qwen2VLFluxEncoder(layout.root, device=device)
    encoded = []
    for picture, prompt in conditions:
        parts, prompt_tokens = encoder.encode_parts(
            [("a", picture, None)], prompt, PROMPT_BUDGET if prompt else IMAGE_ONLY_BUDGET)
        # clone() outside inference mode: inference tensors cannot take part in autograd.
        encoded.append(Encoded(parts[0].tokens.clone(), None if prompt_tokens is None else prompt_tokens.clone()))
    pooled = encoder.pooled.clone()
    log.write(stage="encode", step=len(encoded), loss=None, seconds=round(time.perf_counter() - start, 4))
    del encoder
    return encoded, pooled


def _groups(encoded: list[Encoded], prompts: bool) -> list[list[int]]:
    """Scenes whose text streams have the same shape, so they batch without padding."""
    groups: dict[tuple, list[int]] = {}
    for i, e in enumerate(encoded):
        groups.setdefault((e.qwen.shape[1], prompts and e.prompt is None), []).append(i)
    return list(groups.values())


class Batches:
    """Seeded batches of scene indices drawn from one shape group at a time."""

    def __init__(self, encoded: list[Encoded], batch: int, seed: int, prompts: bool):
        self.groups = _groups(encoded, prompts)
        self.weights = torch.tensor([len(g) for g in self.groups], dtype=torch.float)
        self.batch, self.rng = batch, torch.Generator().manual_seed(seed)

    def __call__(self) -> tuple[list[int], list[int]]:
        """Scene indices, and for each a random other scene of the same group."""
        group = self.groups[int(torch.multinomial(self.weights, 1, generator=self.rng))]
        n = min(self.batch, len(group))
        picks = torch.randint(len(group), (n,), generator=self.rng)
        others = torch.randint(len(group), (n,), generator=self.rng)
        return [group[int(i)] for i in picks], [group[int(i)] for i in others]


def _text_stream(embedder, encoded: list[Encoded], idx: list[int], picture_idx: list[int] | None = None,
                 prompts: bool = True) -> torch.Tensor:
    """cat[context_embedder(qwen), t5 tokens], as FluxGenerator._text_streams builds it; the
    picture tokens may come from other scenes (`picture_idx`) than the captions."""
    parts = [embedder(torch.cat([encoded[i].qwen for i in picture_idx or idx]))]
    if prompts and encoded[idx[0]].prompt is not None:
        parts.append(torch.cat([encoded[i].prompt for i in idx]))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def _latents(gen, images, size: int, seed: int) -> torch.Tensor:
    """Packed VAE latents, made as the generator makes them (`_encode_image`: preprocess,
    latent_dist.sample, shift and scale; then `_pack`), 256 images at a time."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.cat([gen._pack(gen._encode_image(images[i:i + 256], size, size, generator, 1))
                      for i in range(0, len(images), 256)])


def _flow_sample(x0: torch.Tensor, source: torch.Tensor, rng: torch.Generator):
    """A point on the straight path that starts at t0 from the source noised, x_t0 = (1 - t0)
    source + t0 noise (before t0: x_t = (1 - t) source + t noise), and ends at x0 at t = 0;
    t ~ sigmoid(N(0, 1)), t0 ~ U(EDIT_START). Target: the path's velocity, (x_t - x0) / t. Where
    source is x0 this is plain rectified flow: x_t = (1 - t) x0 + t noise, v = noise - x0."""
    t = torch.sigmoid(torch.randn(x0.shape[0], generator=rng)).to(x0.device)
    t0 = torch.empty(x0.shape[0]).uniform_(*EDIT_START, generator=rng).to(x0.device)
    noise = torch.randn(x0.shape, generator=rng).to(x0.device)
    tt, s = t.view(-1, 1, 1), torch.maximum(t, t0).view(-1, 1, 1)
    x_t = tt * noise + (tt / s) * (1 - s) * source + (1 - tt / s) * x0
    return t, x_t, noise + ((1 - s) * source - x0) / s


def _sampler(gen, latents: torch.Tensor, sources: torch.Tensor, encoded: list[Encoded], size: int, batch: int,
             seed: int, prompts: bool = True, others_every: int = 0):
    """Per step: scene indices, the scenes whose pictures condition them (another scene of the
    batch's group on all steps but every `others_every`-th, if set), and the flow-matching sample
    started from those pictures' latents (`sources`); plus the fixed img_ids."""
    latent_side = 2 * (size // (gen.vae_scale_factor * 2))
    image_ids = gen._image_ids(latent_side, latent_side)
    batches, rng = Batches(encoded, batch, seed, prompts), torch.Generator().manual_seed(seed + 1)

    def sample(step: int):
        idx, others = batches()
        pictures = others if others_every and step % others_every else idx
        return (idx, pictures, *_flow_sample(latents[idx], sources[pictures], rng))

    return sample, image_ids


def _save_with_embedder(model, embedder, path: Path) -> None:
    """The published layout keeps context_embedder inside the model: put it back to save. In
    bf16, as FLUX.1-dev ships, which keeps the checkpoint under 40 MB."""
    model.context_embedder = embedder
    model.to(torch.bfloat16).save_pretrained(path)
    model.to(torch.float32)
    model.context_embedder = torch.nn.Identity()


# ---------------------------------------------------------------- 3. FLUX transformer

def train_flux(gen, latents: torch.Tensor, sources: torch.Tensor, encoded: list[Encoded], pooled: torch.Tensor,
               size: int, steps: int, batch: int, lr: float, seed: int, log: Log, deadline: float | None) -> None:
    torch.manual_seed(seed)
    transformer, embedder, device = gen.transformer.train(), gen.context_embedder.train(), gen.device
    sample, image_ids = _sampler(gen, latents, sources, encoded, size, batch, seed)

    def loss_fn(step):
        idx, _, t, x_t, target = sample(step)
        text = _text_stream(embedder, encoded, idx)
        pred = transformer(
            hidden_states=x_t, timestep=t, guidance=torch.full([len(idx)], GUIDANCE, device=device),
            pooled_projections=pooled.repeat(len(idx), 1), encoder_hidden_states=text,
            txt_ids=torch.zeros(text.shape[1], 3, device=device), img_ids=image_ids, return_dict=False)[0]
        return F.mse_loss(pred, target)

    run_steps("flux", steps, loss_fn, list(transformer.parameters()) + list(embedder.parameters()),
              log, deadline, lr=lr)
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


def train_controlnet(gen, latents: torch.Tensor, controls: dict[str, torch.Tensor],
                     encoded: list[Encoded], pooled: torch.Tensor, size: int, steps: int, batch: int, lr: float,
                     seed: int, log: Log, deadline: float | None) -> None:
    torch.manual_seed(seed)
    controlnet, embedder, device = gen.controlnet.train(), gen.controlnet_context_embedder.train(), gen.device
    gen.transformer.requires_grad_(False)
    gen.context_embedder.requires_grad_(False)
    # paths start from the picture's scene (clean, even where its tokens are of a corrected picture)
    sample, image_ids = _sampler(gen, latents, latents, encoded, size, batch, seed, prompts=False, others_every=4)

    def loss_fn(step):
        idx, pictures, t, x_t, target = sample(step)
        n = len(idx)
        guidance = torch.full([n], GUIDANCE, device=device)
        text = _text_stream(gen.context_embedder, encoded, idx, pictures, prompts=False)
        control_text = _text_stream(embedder, encoded, idx, pictures, prompts=False)
        txt_ids = torch.zeros(text.shape[1], 3, device=device)
        blocks = singles = None
        for kind in CONTROL_CHOICES[(step // 4) % len(CONTROL_CHOICES)]:   # depth, line, both (summed)
            union_mode, scale = CONTROLS[kind]
            b, s = controlnet(
                hidden_states=x_t, controlnet_cond=controls[kind][idx],
                controlnet_mode=torch.full((n, 1), union_mode, device=device, dtype=torch.long),
                conditioning_scale=scale, timestep=t, guidance=guidance, pooled_projections=pooled.repeat(n, 1),
                encoder_hidden_states=control_text, txt_ids=txt_ids, img_ids=image_ids, return_dict=False)
            blocks = b if blocks is None else [x + y for x, y in zip(blocks, b)]
            singles = s if singles is None else [x + y for x, y in zip(singles, s)]
        pred = gen.transformer(
            hidden_states=x_t, timestep=t, guidance=guidance, pooled_projections=pooled.repeat(n, 1),
            encoder_hidden_states=text, txt_ids=txt_ids, img_ids=image_ids,
            controlnet_block_samples=blocks, controlnet_single_block_samples=singles, return_dict=False)[0]
        return F.mse_loss(pred, target)

    run_steps("controlnet", steps, loss_fn, list(controlnet.parameters()) + list(embedder.parameters()),
              log, deadline, lr=lr)
    controlnet.eval(), embedder.eval()


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qwen2vl_flux.training.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write (published layout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget for the three training stages")
    p.add_argument("--size", type=int, default=128, help="training resolution (square, multiple of 16)")
    p.add_argument("--scenes", type=int, default=4096, help="training scenes (scenes.TRAIN_SEED)")
    p.add_argument("--batch", type=int, default=32, help="FLUX and ControlNet batch")
    p.add_argument("--batch-vae", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4, help="FLUX and ControlNet peak learning rate")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model sizes")
    p.add_argument("--steps-vae", type=int, default=3000)
    p.add_argument("--steps-flux", type=int, default=6000)
    p.add_argument("--steps-controlnet", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def declare_trained_model(layout: CheckpointLayout, size: int) -> None:
    """What the trained model is, for the servers: its native size (NATIVE_SIZE_FILE), and
    no detector weights. The preset's Depth Anything and MTEED are random and nothing
    here trains them, so they go: "auto" then uses canny, and depth maps must be given."""
    from qwen2vl_flux.checkpoints import NATIVE_SIZE_FILE

    (layout.root / NATIVE_SIZE_FILE).write_text(json.dumps({"native_size": size}) + "\n")
    shutil.rmtree(layout.depth_anything, ignore_errors=True)
    shutil.rmtree(layout.anyline.parent, ignore_errors=True)


def main(argv=None) -> Path:
    from qwen2vl_flux.checkpoints.tiny import make_tiny_checkpoints
    from qwen2vl_flux.generator_server.pipeline import FluxGenerator

    args = parse_args(argv)
    if args.size % 16:
        raise SystemExit("--size must be a multiple of 16 (the generator floors sizes to 16)")
    started = time.perf_counter()
    layout = CheckpointLayout(make_tiny_checkpoints(args.out, PRESETS[args.preset]()))
    declare_trained_model(layout, args.size)
    log, budget, device = Log(layout.root / "training_log.jsonl"), Budget(args.minutes), torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    scene_list = list(scenes.scenes(scenes.TRAIN_SEED, args.scenes))
    images = [scenes.render(s, args.size) for s in scene_list]
    maps = {"depth": [scenes.depth_map(s, args.size).convert("RGB") for s in scene_list],
            "line": [scenes.edge_map(s, args.size).convert("RGB") for s in scene_list]}

    quarter = max(1, len(images) // 4)
    train_vae(layout, images, maps["depth"][:quarter] + maps["line"][:quarter], args.steps_vae, args.batch_vae,
              device, args.seed, log, budget.stage_deadline("vae"))
    conditions = [conditioning(s, i, image) for i, (s, image) in enumerate(zip(scene_list, images))]
    encoded, pooled = encode_scenes(layout, conditions, device, log)

    gen = FluxGenerator(layout.root, device=args.device)   # loads the trained VAE
    gen.vae.requires_grad_(False)
    latents = _latents(gen, images, args.size, args.seed)
    sources = latents.clone()   # the latents of the conditioning pictures that are not the scene
    changed = [i for i, (picture, _) in enumerate(conditions) if picture is not images[i]]
    if changed:
        sources[changed] = _latents(gen, [conditions[i][0] for i in changed], args.size, args.seed + 4)
    train_flux(gen, latents, sources, encoded, pooled, args.size, args.steps_flux, args.batch, args.lr,
               args.seed + 1, log, budget.stage_deadline("flux"))
    _save_with_embedder(gen.transformer, gen.context_embedder, layout.transformer)

    controls = {kind: _latents(gen, kind_maps, args.size, args.seed + 2) for kind, kind_maps in maps.items()}
    init_controlnet_from_transformer(gen)
    train_controlnet(gen, latents, controls, encoded, pooled, args.size, args.steps_controlnet,
                     args.batch, args.lr, args.seed + 3, log, budget.stage_deadline("controlnet"))
    _save_with_embedder(gen.controlnet, gen.controlnet_context_embedder, layout.controlnet)

    total = sum(f.stat().st_size for f in layout.root.rglob("*") if f.is_file())
    print(json.dumps({"out": str(layout.root), "bytes": total, "seconds": round(time.perf_counter() - started, 1)}))
    return layout.root


if __name__ == "__main__":
    main()
