"""Test oracles: the five Qwen2VL-Flux modes rebuilt in-process from stock parts.

Built only from stock transformers / diffusers classes, exactly as ../shared/MODEL_NOTES.md
describes (fp32, CPU, eager vision/T5 attention, float64 sigma shift), so that it reproduces the
original model bit for bit. It deliberately imports nothing from the `qwen2vl_flux` package: it is
what the encoder and generator servers are compared against, so sharing their code would let a
bug in that code pass unseen.

Modes: variation and img2img / inpaint use the stock FluxPipeline / FluxImg2ImgPipeline /
FluxInpaintPipeline fed precomputed embeddings. The two ControlNet modes run a denoise loop
written here (`_controlnet_generate`), because the stock ControlNet pipelines send one set of
embeddings to both ControlNet and transformer and fail for batch > 1. Each call seeds one CPU
`torch.Generator`; the order of its draws is the one listed under "Seeds" in MODEL_NOTES.
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxImg2ImgPipeline,
                       FluxInpaintPipeline, FluxPipeline, FluxTransformer2DModel)
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel, Qwen2VLModel, T5EncoderModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

MESSAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]


def _linear(path: Path) -> torch.nn.Linear:
    """A Linear from a `.pt` state dict, with any `module.` / `linear.` prefix stripped."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module.").removeprefix("linear."): v for k, v in state.items()}
    out_features, in_features = state["weight"].shape
    layer = torch.nn.Linear(in_features, out_features)
    layer.load_state_dict(state)
    return layer.eval()


@functools.lru_cache(maxsize=4)
def load_models(checkpoints: str) -> dict:
    """Every component of the variation mode, loaded once per checkpoint directory."""
    root = Path(checkpoints)
    qwen_dir, flux = root / "qwen2-vl", root / "flux"
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = json.loads((qwen_dir / "chat_template.json").read_text())["chat_template"]
    transformer = FluxTransformer2DModel.from_pretrained(flux / "transformer", torch_dtype=torch.float32).eval()
    context_embedder = transformer.context_embedder
    transformer.context_embedder = torch.nn.Identity()
    return dict(
        qwen=Qwen2VLModel.from_pretrained(
            qwen_dir, attn_implementation={"text_config": "sdpa", "vision_config": "eager"},
            dtype=torch.float32).eval(),
        qwen_tokenizer=tokenizer,
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(qwen_dir),
        connector=_linear(qwen_dir / "connector.pt"),
        t5_embedder=_linear(qwen_dir / "t5_embedder.pt"),
        t5_tokenizer=AutoTokenizer.from_pretrained(flux / "tokenizer_2"),
        t5=T5EncoderModel.from_pretrained(flux / "text_encoder_2", attn_implementation="eager",
                                          dtype=torch.float32).eval(),
        clip_tokenizer=AutoTokenizer.from_pretrained(flux / "tokenizer"),
        clip=CLIPTextModel.from_pretrained(flux / "text_encoder", dtype=torch.float32).eval(),
        transformer=transformer,
        context_embedder=context_embedder,
        vae=AutoencoderKL.from_pretrained(flux / "vae", torch_dtype=torch.float32).eval(),
        scheduler_config=FlowMatchEulerDiscreteScheduler.load_config(flux / "scheduler"),
    )


def load_controlnet(checkpoints: str) -> dict:
    """`load_models` plus the union ControlNet, added to that cache on first use.

    Like the transformer's, the ControlNet's `context_embedder` is kept apart (as
    `controlnet_context_embedder`) and replaced by `nn.Identity()`.
    """
    m = load_models(checkpoints)
    if "controlnet" not in m:
        controlnet = FluxControlNetModel.from_pretrained(Path(checkpoints) / "controlnet",
                                                         torch_dtype=torch.float32).eval()
        m["controlnet_context_embedder"] = controlnet.context_embedder
        controlnet.context_embedder = torch.nn.Identity()
        m["controlnet"] = controlnet
    return m


@torch.no_grad()
def reference_qwen_states(checkpoints: str, image: Image.Image, pixel_budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL last_hidden_state at the image-pad positions (1, N, H), and image_grid_thw (1, 3)."""
    m = load_models(checkpoints)
    qwen, tokenizer = m["qwen"], m["qwen_tokenizer"]
    vision = m["image_processor"](images=[image.convert("RGB")], return_tensors="pt",
                                  size={"shortest_edge": pixel_budget, "longest_edge": pixel_budget})
    grid = vision["image_grid_thw"]
    text = tokenizer.apply_chat_template(MESSAGE, tokenize=False, add_generation_prompt=True)
    assert text.count("<|image_pad|>") == 1, text
    text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // 4))
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    image_mask = input_ids == qwen.config.image_token_id
    hidden = qwen(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  pixel_values=vision["pixel_values"], image_grid_thw=grid,
                  mm_token_type_ids=image_mask.long(), use_cache=False).last_hidden_state
    return hidden[image_mask].view(1, -1, hidden.shape[-1]), grid


def apply_focus(states: torch.Tensor, grid: torch.Tensor, center_x: float, center_y: float, radius: float) -> torch.Tensor:
    """Weight the (1, N, H) states by a radial mask on the merged (h/2, w/2) token grid (float64 mask)."""
    _, h, w = (int(v) for v in grid[0])
    height, width = h // 2, w // 2
    y, x = np.ogrid[:height, :width]
    dist = np.sqrt((x - center_x * width) ** 2 + (y - center_y * height) ** 2)
    attention = torch.from_numpy(np.clip(1 - dist / (radius * min(height, width)), 0, 1)).to(states.dtype)
    return (states.view(1, height, width, -1) * attention[None, :, :, None]).view(1, -1, states.shape[-1])


def shifted_sigmas(scheduler_config: dict, steps: int, height: int, width: int) -> list[float]:
    """FLUX.1-dev dynamic shift of linspace(1, 1/steps, steps), done in float64."""
    c = scheduler_config
    m = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    b = c["base_shift"] - m * c["base_image_seq_len"]
    mu = (height // 16) * (width // 16) * m + b
    s = np.linspace(1.0, 1 / steps, steps)
    return list(np.exp(mu) / (np.exp(mu) + (1 / s - 1)))


# ------------------------------------------------------------------------------------------------
# Shared preparation
# ------------------------------------------------------------------------------------------------

DEPTH_MODE, LINE_MODE = 2, 0  # union ControlNet modes (canny/line 0, depth 2)
DEFAULT_DEPTH_STRENGTH, DEFAULT_LINE_STRENGTH = 0.2, 0.4
MAX_AREA = 1_050_000


def reference_resize(image: Image.Image) -> Image.Image:
    """The generation size of every mode but variation (MODEL_NOTES "Aspect ratios").

    1. If the area exceeds 1,050,000 pixels, scale both sides by sqrt(1.05e6 / area), int().
    2. Floor each side to a multiple of 8.
    3. Resize with LANCZOS, only if the size changed.
    The pipelines' VaeImageProcessor later floors each side to a multiple of 16 itself.
    """
    width, height = image.size
    if width * height > MAX_AREA:
        scale = math.sqrt(MAX_AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
    width, height = width - width % 8, height - height % 8
    return image if (width, height) == image.size else image.resize((width, height), Image.LANCZOS)


def _qwen_4096(checkpoints: str, image: Image.Image, prompt: str,
               focus: tuple[float, float, float] | None = None) -> torch.Tensor:
    """connector(Qwen2-VL states (+focus)) of one image, (1, N, 4096); pixel budget from the prompt."""
    m = load_models(checkpoints)
    states, grid = reference_qwen_states(checkpoints, image, (256 if prompt else 512) * 28 * 28)
    if focus is not None:
        states = apply_focus(states, grid, *focus)
    return m["connector"](states)


def _t5_part(m: dict, prompt: str) -> list[torch.Tensor]:
    """[t5_embedder(T5(prompt))] of shape (1, 256, D) for a non-empty prompt, else []."""
    if not prompt:
        return []
    ids = m["t5_tokenizer"](prompt, padding="max_length", max_length=256, truncation=True,
                            return_tensors="pt").input_ids
    return [m["t5_embedder"](m["t5"](ids)[0])]


def _pooled(m: dict) -> torch.Tensor:
    """CLIP pooler_output of the empty string, (1, 768): the prompt never reaches CLIP."""
    ids = m["clip_tokenizer"]("", padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    return m["clip"](ids).pooler_output


def _stream(context_embedder: torch.nn.Module, qwen: torch.Tensor, t5: list[torch.Tensor]) -> torch.Tensor:
    """One text stream: cat([context_embedder(qwen_4096), t5_part], dim=1)."""
    return torch.cat([context_embedder(qwen), *t5], dim=1)


def _conditioning(checkpoints: str, image: Image.Image, reference: Image.Image | None, prompt: str,
                  focus: tuple[float, float, float] | None,
                  controlnet: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Text streams of the image-conditioned modes: (prompt_embeds, control_embeds or None, pooled).

    1. qwen(b) = connector(Qwen(b) (+focus)) when b is given; focus is ignored without b.
    2. qwen(a) = connector(Qwen(a)) when b is absent, or always for the ControlNet.
    3. ControlNet modes with b: truncate qwen(a) and qwen(b) to the shorter length.
    4. Transformer: context_embedder(qwen(b) or qwen(a)) [+ t5];
       ControlNet: controlnet_context_embedder(qwen(a)) [+ the same t5].
    """
    m = load_controlnet(checkpoints) if controlnet else load_models(checkpoints)
    qwen_b = _qwen_4096(checkpoints, reference, prompt, focus) if reference is not None else None
    qwen_a = _qwen_4096(checkpoints, image, prompt) if qwen_b is None or controlnet else None
    if controlnet and qwen_b is not None:
        n = min(qwen_a.shape[1], qwen_b.shape[1])
        qwen_a, qwen_b = qwen_a[:, :n], qwen_b[:, :n]
    t5 = _t5_part(m, prompt)
    prompt_embeds = _stream(m["context_embedder"], qwen_b if qwen_b is not None else qwen_a, t5)
    control_embeds = _stream(m["controlnet_context_embedder"], qwen_a, t5) if controlnet else None
    return prompt_embeds, control_embeds, _pooled(m)


def _scheduler(m: dict) -> FlowMatchEulerDiscreteScheduler:
    """The checkpoint's scheduler with shifting off: the float64-shifted sigmas are passed in."""
    return FlowMatchEulerDiscreteScheduler.from_config(m["scheduler_config"], use_dynamic_shifting=False, shift=1.0)


def _stock_pipeline(cls: type, m: dict):
    """A stock Flux pipeline without text encoders (fed prompt_embeds + pooled_prompt_embeds)."""
    pipe = cls(scheduler=_scheduler(m), vae=m["vae"], text_encoder=None, tokenizer=None,
               text_encoder_2=None, tokenizer_2=None, transformer=m["transformer"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------------
# Variation, img2img, inpaint: stock pipelines
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def reference_variation(checkpoints: str, image: Image.Image, prompt: str = "",
                        focus: tuple[float, float, float] | None = None, seed: int = 0, steps: int = 2,
                        guidance: float = 3.5, width: int = 64, height: int = 64,
                        image_count: int = 1) -> list[Image.Image]:
    """The variation mode end to end (fp32, CPU).

    1. Transformer stream: context_embedder(connector(Qwen(a) (+focus))) [+ t5_embedder(T5(prompt))].
    2. Stock FluxPipeline at the given size (the aspect-ratio table's), float64-shifted sigmas;
       the generator's only draw is the noise.
    """
    m = load_models(checkpoints)
    prompt_embeds = _stream(m["context_embedder"], _qwen_4096(checkpoints, image, prompt, focus),
                            _t5_part(m, prompt))
    return _stock_pipeline(FluxPipeline, m)(
        prompt_embeds=prompt_embeds, pooled_prompt_embeds=_pooled(m), num_inference_steps=steps,
        sigmas=shifted_sigmas(m["scheduler_config"], steps, height, width), guidance_scale=guidance,
        height=height, width=width, num_images_per_prompt=image_count,
        generator=torch.Generator().manual_seed(seed), output_type="pil").images


@torch.no_grad()
def _stock_image_mode(pipeline_cls: type, checkpoints: str, image: Image.Image, reference: Image.Image | None,
                      prompt: str, focus: tuple[float, float, float] | None, seed: int, steps: int,
                      strength: float, guidance: float, image_count: int, **extra) -> list[Image.Image]:
    """img2img / inpaint through a stock pipeline.

    1. Transformer stream from qwen(b) (+focus) or qwen(a) [+ t5] (`_conditioning`); Qwen sees
       the images as given (the original encodes image a before resizing it).
    2. Resize image a (`reference_resize`); its multiple-of-8 size is the generation size.
    3. Stock pipeline with float64-shifted sigmas for that size, strength, one seeded generator
       (draws: init-image sample, noise, then for inpaint the unused masked-image sample).
    """
    m = load_models(checkpoints)
    prompt_embeds, _, pooled = _conditioning(checkpoints, image, reference, prompt, focus)
    init_image = reference_resize(image.convert("RGB"))
    width, height = init_image.size
    return _stock_pipeline(pipeline_cls, m)(
        image=init_image, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, num_inference_steps=steps,
        sigmas=shifted_sigmas(m["scheduler_config"], steps, height, width), strength=strength,
        guidance_scale=guidance, height=height, width=width, num_images_per_prompt=image_count,
        generator=torch.Generator().manual_seed(seed), output_type="pil", **extra).images


def reference_img2img(checkpoints: str, image: Image.Image, reference: Image.Image | None = None,
                      prompt: str = "", focus: tuple[float, float, float] | None = None, seed: int = 0,
                      steps: int = 2, strength: float = 0.8, guidance: float = 3.5,
                      image_count: int = 1) -> list[Image.Image]:
    """img2img: stock FluxImg2ImgPipeline from the resized image a (see `_stock_image_mode`)."""
    return _stock_image_mode(FluxImg2ImgPipeline, checkpoints, image, reference, prompt, focus, seed, steps,
                             strength, guidance, image_count)


def reference_inpaint(checkpoints: str, image: Image.Image, mask: Image.Image,
                      reference: Image.Image | None = None, prompt: str = "",
                      focus: tuple[float, float, float] | None = None, seed: int = 0, steps: int = 2,
                      strength: float = 0.8, guidance: float = 3.5, image_count: int = 1) -> list[Image.Image]:
    """inpaint: stock FluxInpaintPipeline (see `_stock_image_mode`); white in the mask = repaint.

    The mask goes through the same resize as image a (LANCZOS); the pipeline's mask processor then
    converts it to grey and binarises it at 0.5.
    """
    return _stock_image_mode(FluxInpaintPipeline, checkpoints, image, reference, prompt, focus, seed, steps,
                             strength, guidance, image_count, mask_image=reference_resize(mask))


# ------------------------------------------------------------------------------------------------
# ControlNet modes: a denoise loop from stock parts
# ------------------------------------------------------------------------------------------------

def _control_maps(depth_map: Image.Image | None, line_map: Image.Image | None, use_depth: bool, use_line: bool,
                  depth_strength: float, line_strength: float) -> list[tuple[Image.Image, int, float]]:
    """[(map, union mode, scale)]: depth (mode 2) then line (mode 0), each only if enabled.

    With neither enabled, both are used at the fixed 0.2 / 0.4 (the caller's strengths ignored).
    """
    if not (use_depth or use_line):
        use_depth = use_line = True
        depth_strength, line_strength = DEFAULT_DEPTH_STRENGTH, DEFAULT_LINE_STRENGTH
    maps = []
    if use_depth:
        maps.append((depth_map, DEPTH_MODE, depth_strength))
    if use_line:
        maps.append((line_map, LINE_MODE, line_strength))
    assert all(image is not None for image, _, _ in maps), "an enabled control map is missing"
    return maps


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C), FluxPipeline's 2x2 packing."""
    return FluxPipeline._pack_latents(latents, *latents.shape)


def _vae_sample(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random draw: (vae.encode(pixels).latent_dist.sample(generator) - shift) * scale."""
    latents = vae.encode(pixels).latent_dist.sample(generator)
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def _controlnet_denoise_step(m: dict, latents: torch.Tensor, t: torch.Tensor, guidance: float,
                             applied: list[tuple[torch.Tensor, int, float]], prompt_embeds: torch.Tensor,
                             control_embeds: torch.Tensor, pooled: torch.Tensor, text_ids: torch.Tensor,
                             image_ids: torch.Tensor) -> torch.Tensor:
    """The velocity at t: ControlNet once per applied map (residuals summed over maps), then the transformer."""
    transformer, controlnet = m["transformer"], m["controlnet"]
    batch = latents.shape[0]
    timestep = t.expand(batch).to(latents.dtype) / 1000

    def guidance_for(model):
        return torch.full([batch], guidance, dtype=torch.float32) if model.config.guidance_embeds else None

    blocks = singles = None
    for cond, mode, scale in applied:
        block, single = controlnet(
            hidden_states=latents, controlnet_cond=cond, controlnet_mode=torch.full((batch, 1), mode, dtype=torch.long),
            conditioning_scale=scale, timestep=timestep, guidance=guidance_for(controlnet),
            pooled_projections=pooled, encoder_hidden_states=control_embeds, txt_ids=text_ids, img_ids=image_ids,
            return_dict=False)
        if blocks is None:
            blocks, singles = block, single
        else:
            blocks = [a + b for a, b in zip(blocks, block)]
            singles = [a + b for a, b in zip(singles, single)]
    return transformer(
        hidden_states=latents, timestep=timestep, guidance=guidance_for(transformer), pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds, controlnet_block_samples=blocks,
        controlnet_single_block_samples=singles, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]


@torch.no_grad()
def _controlnet_generate(checkpoints: str, image: Image.Image, maps: list[tuple[Image.Image, int, float]],
                         mask: Image.Image | None, reference: Image.Image | None, prompt: str,
                         focus: tuple[float, float, float] | None, seed: int, steps: int, strength: float,
                         guidance: float, image_count: int, corrected: bool) -> list[Image.Image]:
    """controlnet (mask None) / controlnet-inpaint (mask given), fp32 CPU, one seeded generator.

    1. Resize image a for the VAE; (H8, W8) = its multiple-of-8 size; latent grid
       (2*(H8//16), 2*(W8//16)).
    2. Streams (`_conditioning(controlnet=True)`; Qwen sees image a unresized): the transformer
       gets qwen(b) or qwen(a), the ControlNet qwen(a) (both truncated to the shorter length when
       b is given), repeated to B; txt_ids = zeros(text_len, 3) for both.
    3. Schedule: float64-shifted sigmas, then strength: t_start = int(N - min(N*s, N)),
       timesteps[t_start:], scheduler.set_begin_index(t_start).
    4. Draws, in this order: each map's VAE sample at batch B (map order), the init image's
       sample at batch 1 (repeated to B), the noise. (inpaint: the masked-image sample would come
       last and is unused, so it is skipped.)
    5. Start: controlnet, reference quirk: pure noise (the init sample is discarded);
       corrected, or controlnet-inpaint: scale_noise(init, timesteps[0], noise).
    6. Maps applied in the loop: all, except the controlnet-inpaint reference quirk (first map only).
    7. Loop: ControlNet residuals summed over maps -> transformer -> scheduler.step; inpaint then
       blends (1 - mask) * init noised to timesteps[i+1] (init itself after the last step)
       + mask * latents.
    8. Decode: unpack, / scaling_factor + shift_factor, vae.decode, postprocess to PIL.
    """
    m = load_controlnet(checkpoints)
    vae, scheduler, batch = m["vae"], _scheduler(m), image_count
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = m["transformer"].config.in_channels // 4
    processor = VaeImageProcessor(vae_scale_factor=vae_scale * 2, vae_latent_channels=vae.config.latent_channels)
    generator = torch.Generator().manual_seed(seed)

    # 1. size
    init_image = reference_resize(image.convert("RGB"))
    width, height = init_image.size
    latent_h, latent_w = 2 * (height // (vae_scale * 2)), 2 * (width // (vae_scale * 2))

    # 2. text streams (Qwen sees image a as given, not resized) and ids
    prompt_embeds, control_embeds, pooled = _conditioning(checkpoints, image, reference, prompt, focus,
                                                          controlnet=True)
    prompt_embeds, control_embeds, pooled = (x.repeat(batch, *[1] * (x.ndim - 1))
                                             for x in (prompt_embeds, control_embeds, pooled))
    text_ids = torch.zeros(prompt_embeds.shape[1], 3)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, latent_h // 2, latent_w // 2, "cpu", torch.float32)

    # 3. schedule and strength
    scheduler.set_timesteps(sigmas=shifted_sigmas(m["scheduler_config"], steps, height, width), device="cpu")
    n = len(scheduler.timesteps)
    t_start = int(n - min(n * strength, n))
    timesteps = scheduler.timesteps[t_start:]
    if len(timesteps) < 1:
        raise ValueError(f"strength {strength} leaves no step of {steps}")
    scheduler.set_begin_index(t_start)

    # 4. random draws, in the reference's order
    conds = [_pack(_vae_sample(vae, processor.preprocess(control.convert("RGB"), height=height, width=width)
                               .repeat_interleave(batch, 0), generator))
             for control, _, _ in maps]
    # The init image is encoded in the preprocessor's channels-last view, as the original does (a
    # contiguous copy changes the last bit); control maps go through repeat_interleave, a copy.
    init = _vae_sample(vae, processor.preprocess(init_image, height=height, width=width), generator)
    init = _pack(init.repeat(batch, 1, 1, 1))
    noise = _pack(randn_tensor((batch, channels, latent_h, latent_w), generator=generator, dtype=torch.float32))

    # 5. start latents
    if mask is not None or corrected:
        latents = scheduler.scale_noise(init, timesteps[:1].repeat(batch), noise)
    else:
        latents = noise

    # 6. applied maps, and the inpaint mask on the packed latent grid
    applied = [(cond, mode, scale) for cond, (_, mode, scale) in zip(conds, maps)]
    if mask is not None:
        if not corrected:
            applied = applied[:1]
        mask_processor = VaeImageProcessor(vae_scale_factor=vae_scale * 2,
                                           vae_latent_channels=vae.config.latent_channels, do_normalize=False,
                                           do_binarize=True, do_convert_grayscale=True)
        mask_pixels = mask_processor.preprocess(reference_resize(mask), height=height, width=width)
        mask_latents = F.interpolate(mask_pixels, size=(latent_h, latent_w)).repeat(batch, 1, 1, 1)
        mask_latents = _pack(mask_latents.repeat(1, channels, 1, 1))

    # 7. denoise
    for i, t in enumerate(timesteps):
        velocity = _controlnet_denoise_step(m, latents, t, guidance, applied, prompt_embeds, control_embeds,
                                            pooled, text_ids, image_ids)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        if mask is not None:
            known = init
            if i < len(timesteps) - 1:
                known = scheduler.scale_noise(init, timesteps[i + 1:i + 2], noise)
            latents = (1 - mask_latents) * known + mask_latents * latents

    # 8. decode
    latents = FluxPipeline._unpack_latents(latents, height, width, vae_scale)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")


def reference_controlnet(checkpoints: str, image: Image.Image, depth_map: Image.Image | None,
                         line_map: Image.Image | None, reference: Image.Image | None = None, prompt: str = "",
                         focus: tuple[float, float, float] | None = None, seed: int = 0, steps: int = 2,
                         strength: float = 0.8, guidance: float = 3.5, image_count: int = 1,
                         use_depth: bool = True, use_line: bool = True,
                         depth_strength: float = DEFAULT_DEPTH_STRENGTH,
                         line_strength: float = DEFAULT_LINE_STRENGTH, corrected: bool = False) -> list[Image.Image]:
    """controlnet mode (see `_controlnet_generate`). Maps: PIL images of the resized image a's size.

    corrected=False reproduces the reference quirk (start from pure noise; strength only shortens
    the schedule); corrected=True starts from the noised init image like img2img.
    """
    return _controlnet_generate(
        checkpoints, image, _control_maps(depth_map, line_map, use_depth, use_line, depth_strength, line_strength),
        None, reference, prompt, focus, seed, steps, strength, guidance, image_count, corrected)


def reference_controlnet_inpaint(checkpoints: str, image: Image.Image, mask: Image.Image,
                                 depth_map: Image.Image | None, line_map: Image.Image | None,
                                 reference: Image.Image | None = None, prompt: str = "",
                                 focus: tuple[float, float, float] | None = None, seed: int = 0, steps: int = 2,
                                 strength: float = 0.8, guidance: float = 3.5, image_count: int = 1,
                                 use_depth: bool = True, use_line: bool = True,
                                 depth_strength: float = DEFAULT_DEPTH_STRENGTH,
                                 line_strength: float = DEFAULT_LINE_STRENGTH,
                                 corrected: bool = False) -> list[Image.Image]:
    """controlnet-inpaint mode (see `_controlnet_generate`); white in the mask = repaint.

    corrected=False reproduces the reference quirk (only the first map reaches the ControlNet,
    though every map is VAE-encoded); corrected=True applies them all.
    """
    return _controlnet_generate(
        checkpoints, image, _control_maps(depth_map, line_map, use_depth, use_line, depth_strength, line_strength),
        mask, reference, prompt, focus, seed, steps, strength, guidance, image_count, corrected)
