"""The generator half of Qwen2VL-Flux: FLUX transformer, VAE and scheduler (ControlNet
lazily), one denoise core for every mode. Built from stock diffusers parts the
way ../shared/MODEL_NOTES.md describes; no gRPC here.

The seam is diffusers' own: `FluxPipeline.encode_prompt` is replaced by the
encoder service, and everything after `prompt_embeds` happens here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from qwen2vl_flux.checkpoints import CheckpointLayout
from qwen2vl_flux.checkpoints.projections import load_linear
from qwen2vl_flux.client.modes import T5_MAX_LENGTH, Mode, transformer_role, variation_size
from qwen2vl_flux.serving.server import Cancelled
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb

StepCallback = Callable[[int, int], None]


@dataclass
class Conditioning:
    """Trimmed embeddings from one bundle, on the generator's device."""

    images: dict[str, torch.Tensor]   # role -> (1, N, joint_attention_dim)
    prompt: torch.Tensor | None       # (1, T5_MAX_LENGTH, inner_dim)
    pooled: torch.Tensor              # (1, pooled_dim)


@dataclass
class GenerationJob:
    mode: Mode
    params: dict                       # effective parameters (modes.resolve_parameters)
    conditioning: Conditioning
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    ignored: list[str] = field(default_factory=list)   # parameters set that this mode does not use
    timings: dict = field(default_factory=dict)


def shifted_sigmas(steps: int, image_seq_len: int, config) -> np.ndarray:
    """FLUX.1-dev's resolution-dependent shift of linspace(1, 1/N, N), in float64
    (diffusers casts to float32 before shifting; the reference shifts in float64)."""
    m = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    mu = image_seq_len * m + config["base_shift"] - m * config["base_image_seq_len"]
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    return np.exp(mu) / (np.exp(mu) + (1.0 / sigmas - 1.0))


class FluxGenerator:
    def __init__(self, checkpoints: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from diffusers.image_processor import VaeImageProcessor

        layout = CheckpointLayout(Path(checkpoints))
        layout.require(layout.transformer, layout.vae, layout.scheduler, layout.connector, layout.t5_embedder)
        self.layout, self.device, self.dtype = layout, torch.device(device), dtype

        self.transformer = FluxTransformer2DModel.from_pretrained(layout.transformer, torch_dtype=dtype)
        self.transformer = self.transformer.to(self.device).eval()
        # Qwen states reach FLUX through its own context_embedder, T5 states through
        # t5_embedder: keep the former apart and feed the transformer finished tokens.
        self.context_embedder = self.transformer.context_embedder
        self.transformer.context_embedder = torch.nn.Identity()
        self.vae = AutoencoderKL.from_pretrained(layout.vae, torch_dtype=dtype).to(self.device).eval()
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(layout.scheduler)
        self._scheduler_cls = FlowMatchEulerDiscreteScheduler
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

        config = self.transformer.config
        qwen_hidden = load_linear(layout.connector).in_features
        self.fingerprint = pb.ModelFingerprint(
            family="qwen2vl-flux", checkpoint_id=layout.checkpoint_id(), qwen_hidden_size=qwen_hidden,
            joint_attention_dim=config.joint_attention_dim,
            inner_dim=config.num_attention_heads * config.attention_head_dim,
            pooled_dim=config.pooled_projection_dim, t5_max_length=T5_MAX_LENGTH)

    # ------------------------------------------------------------ entry point

    @torch.inference_mode()
    def generate(self, job: GenerationJob, on_step: StepCallback | None = None,
                 cancelled: Callable[[], bool] = lambda: False) -> list[Image.Image]:
        if job.mode is not Mode.VARIATION:
            raise NotImplementedError(f"mode {job.mode.value} is not served by this version of the generator "
                                      "(variation only)")
        params = job.params
        count = params["image_count"]
        generator = torch.Generator("cpu").manual_seed(int(params["seed"]))

        # 1. Text stream: context_embedder(qwen) followed by the T5 tokens.
        start = time.perf_counter()
        role = transformer_role(job.mode, set(job.conditioning.images))
        prompt_embeds, text_ids, pooled = self._text_stream(job.conditioning, role, count)

        # 2. Size and initial latents (noise drawn on the CPU: same noise on any device).
        width, height = variation_size(params)
        latents, image_ids, latent_h, latent_w = self._noise(count, height, width, generator)

        # 3. Timesteps.
        scheduler, timesteps = self._timesteps(params["steps"], latents.shape[1])
        guidance = self._guidance(params["guidance"], count)
        job.timings["prepare"] = time.perf_counter() - start

        # 4. Denoise.
        start = time.perf_counter()
        latents = self.denoise(latents, timesteps, scheduler, prompt_embeds=prompt_embeds, text_ids=text_ids,
                               pooled=pooled, image_ids=image_ids, guidance=guidance,
                               on_step=on_step, cancelled=cancelled)
        job.timings["denoise"] = time.perf_counter() - start

        # 5. Decode.
        start = time.perf_counter()
        images = self.decode(latents, height, width)
        job.timings["decode"] = time.perf_counter() - start
        return images

    # ------------------------------------------------------------ steps

    def _text_stream(self, cond: Conditioning, role: str, count: int):
        tokens = self.context_embedder(cond.images[role])
        if cond.prompt is not None:
            tokens = torch.cat([tokens, cond.prompt], dim=1)
        text_ids = torch.zeros(tokens.shape[1], 3, device=self.device, dtype=self.dtype)
        return tokens.repeat(count, 1, 1), text_ids, cond.pooled.repeat(count, 1)

    def _noise(self, count: int, height: int, width: int, generator: torch.Generator):
        from diffusers import FluxPipeline
        from diffusers.utils.torch_utils import randn_tensor

        latent_h = 2 * (height // (self.vae_scale_factor * 2))
        latent_w = 2 * (width // (self.vae_scale_factor * 2))
        channels = self.transformer.config.in_channels // 4
        noise = randn_tensor((count, channels, latent_h, latent_w), generator=generator,
                             device=self.device, dtype=self.dtype)
        latents = FluxPipeline._pack_latents(noise, count, channels, latent_h, latent_w)
        image_ids = FluxPipeline._prepare_latent_image_ids(count, latent_h // 2, latent_w // 2,
                                                           self.device, self.dtype)
        return latents, image_ids, latent_h, latent_w

    def _timesteps(self, steps: int, image_seq_len: int):
        scheduler = self._scheduler_cls.from_config(self.scheduler_config, use_dynamic_shifting=False, shift=1.0)
        scheduler.set_timesteps(sigmas=list(shifted_sigmas(steps, image_seq_len, self.scheduler_config)),
                                device=self.device)
        scheduler.set_begin_index(0)
        return scheduler, scheduler.timesteps

    def _guidance(self, scale: float, count: int) -> torch.Tensor | None:
        if not self.transformer.config.guidance_embeds:
            return None
        return torch.full([count], scale, device=self.device, dtype=torch.float32)

    def denoise(self, latents, timesteps, scheduler, *, prompt_embeds, text_ids, pooled, image_ids, guidance,
                on_step: StepCallback | None, cancelled: Callable[[], bool]) -> torch.Tensor:
        """The one denoise core: Euler steps of the flow-matching scheduler."""
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            if cancelled():
                raise Cancelled(f"stopped before step {i + 1} of {total}")
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            noise_pred = self.transformer(
                hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                txt_ids=text_ids, img_ids=image_ids, return_dict=False,
            )[0]
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, total)
        return latents

    def decode(self, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        from diffusers import FluxPipeline

        latents = FluxPipeline._unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="pil")
