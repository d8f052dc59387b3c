"""Test oracle: Qwen2VL-Flux *variation* mode rebuilt in-process from stock parts.

Built only from stock transformers / diffusers classes, exactly as ../shared/MODEL_NOTES.md
describes (fp32, CPU, eager vision/T5 attention, float64 sigma shift), so that it reproduces the
original model bit for bit. It deliberately imports nothing from the `qwen2vl_flux` package: it is
what the encoder and generator servers are compared against, so sharing their code would let a
bug in that code pass unseen.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
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


@torch.no_grad()
def reference_variation(checkpoints: str, image: Image.Image, prompt: str = "",
                        focus: tuple[float, float, float] | None = None, seed: int = 0, steps: int = 2,
                        guidance: float = 3.5, width: int = 64, height: int = 64,
                        image_count: int = 1) -> list[Image.Image]:
    """The variation mode end to end (fp32, CPU): Qwen(a) (+focus) [+ T5(prompt)] -> FluxPipeline."""
    m = load_models(checkpoints)
    states, grid = reference_qwen_states(checkpoints, image, (256 if prompt else 512) * 28 * 28)
    if focus is not None:
        states = apply_focus(states, grid, *focus)
    parts = [m["context_embedder"](m["connector"](states))]
    if prompt:
        ids = m["t5_tokenizer"](prompt, padding="max_length", max_length=256, truncation=True,
                                return_tensors="pt").input_ids
        parts.append(m["t5_embedder"](m["t5"](ids)[0]))
    clip_ids = m["clip_tokenizer"]("", padding="max_length", max_length=77, truncation=True,
                                   return_tensors="pt").input_ids
    pooled = m["clip"](clip_ids).pooler_output
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(m["scheduler_config"], use_dynamic_shifting=False,
                                                           shift=1.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=m["vae"], text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=m["transformer"])
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=torch.cat(parts, dim=1), pooled_prompt_embeds=pooled,
                num_inference_steps=steps, sigmas=shifted_sigmas(m["scheduler_config"], steps, height, width),
                guidance_scale=guidance, height=height, width=width, num_images_per_prompt=image_count,
                generator=torch.Generator().manual_seed(seed), output_type="pil").images
