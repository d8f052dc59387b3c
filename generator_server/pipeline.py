"""The generator half of Qwen2VL-Flux: FLUX transformer, VAE and scheduler (ControlNet
lazily), one denoise core for every mode. Built from stock diffusers parts the
way ../shared/MODEL_NOTES.md describes; no gRPC here.

The seam is diffusers' own: `FluxPipeline.encode_prompt` is replaced by the
encoder service, and everything after `prompt_embeds` happens here.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from qwen2vl_flux.checkpoints import CheckpointLayout, full_size
from qwen2vl_flux.checkpoints.projections import load_linear
from qwen2vl_flux.client.modes import (ROLE_INPUT, T5_MAX_LENGTH, Mode, control_maps_used, generation_size,
                                       resolve_parameters, transformer_role, variation_size)
from qwen2vl_flux.serving.server import Cancelled
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb

from . import blocks, modulation

# on_step(step, total, preview): preview is a small PIL image on the steps that asked for one.
StepCallback = Callable[[int, int, "Image.Image | None"], None]


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
    init_image: Image.Image | None = None     # image a, as uploaded (resized here)
    mask: Image.Image | None = None           # white = repaint, same size as image a
    control_maps: dict[str, Image.Image] = field(default_factory=dict)   # kind -> map
    ignored: list[str] = field(default_factory=list)   # parameters set that this mode does not use
    timings: dict = field(default_factory=dict)
    images: list[Image.Image] = field(default_factory=list)


@dataclass(frozen=True)
class StepCache:
    """Steps that reuse the previous step's velocity instead of running the transformer.

    threshold: diffusers' first-block cache (skips decided by the weights, per request).
    interval: a fixed schedule: the first 4 and last 2 steps run, and in between one step in
    every `interval` (2 runs 17 of 28 steps, 3 runs 14): the same skips for every request.
    """

    threshold: float | None = None
    interval: int | None = None

    @classmethod
    def parse(cls, text: str) -> "StepCache":
        kind, _, value = text.partition(":")
        try:
            if kind == "fixed" and int(value) >= 2:
                return cls(interval=int(value))
            if not value and float(kind) > 0:
                return cls(threshold=float(kind))
        except ValueError:
            pass
        raise ValueError(f"step cache must be a first-block threshold such as 0.08, or fixed:K with K >= 2 "
                         f"(one full step in K), not {text!r}")

    def __str__(self) -> str:
        return f"fixed:{self.interval}" if self.interval else str(self.threshold)

    def skipped(self, total: int) -> frozenset[int]:
        if not self.interval:
            return frozenset()
        head, tail = 4, 2
        return frozenset(i for i in range(head, total - tail) if (i - head) % self.interval)


@dataclass(frozen=True)
class SpeedOptions:
    """Every speed option of the generator in one place (flags of qwen2vl-flux-generator).

    compile: torch.compile of the repeated transformer blocks, with symbolic shapes, and unless
    the first-block cache is on, their GELUs in the products' epilogues, no concatenation before
    a single block's proj_out (blocks.py) and their AdaLN modulation computed for many steps at
    once (modulation.py). attention: a diffusers attention backend ("_native_cudnn" is the fastest
    SDPA on Hopper). turbo: fp8 weights and activations for the transformer's Linear layers
    (generator_server/fp8.py). step_cache: steps that reuse the last velocity (changes images;
    off by default). cuda_graphs: each step's velocity call replayed as a CUDA graph, at most
    this many graphs kept, one per input shape (step_graphs.py; 0: off).
    """

    compile: bool = False
    attention: str | None = None
    turbo: bool = False
    step_cache: StepCache | None = None
    cuda_graphs: int = 0

    @property
    def lossless(self) -> bool:
        return not self.turbo and self.step_cache is None

    def check(self, device: "str | torch.device") -> None:
        """ValueError for options that cannot work together on `device`."""
        if not self.cuda_graphs:
            return
        if torch.device(device).type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {torch.device(device).type}: "
                             "leave them off (--cuda-graphs 0)")
        if self.step_cache is not None and self.step_cache.threshold:
            raise ValueError("CUDA graphs cannot hold the first-block cache (--step-cache THRESHOLD decides "
                             "between blocks on the CPU): use --step-cache fixed:K or --cuda-graphs 0")


class _StepReporter:
    """Reports finished steps without stalling the GPU: on CUDA each step records an
    event, and a step is reported once its event has completed (polled, never waited
    for inside the loop), so the CPU keeps queueing work ahead of the GPU."""

    def __init__(self, on_step: StepCallback | None, total: int, cuda: bool):
        self.on_step, self.total, self.cuda = on_step, total, cuda
        self.pending: list[tuple[int, torch.cuda.Event | None, Image.Image | None]] = []

    def step_launched(self, step: int, preview: "Image.Image | None" = None) -> None:
        if self.on_step is None:
            return
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((step, event, preview))
        while self.pending and (self.pending[0][1] is None or self.pending[0][1].query()):
            step, _, preview = self.pending.pop(0)
            self.on_step(step, self.total, preview)

    def finish(self) -> None:
        for step, event, preview in self.pending:
            if event is not None:
                event.synchronize()
            self.on_step(step, self.total, preview)
        self.pending.clear()


def _cache_sdpa_backend_selection() -> None:
    """Let AOTAutograd cache graphs that pick an SDPA backend (diffusers' "_native_cudnn").

    The pick is torch's `sdpa_kernel` context, whose private helpers land in the traced graph;
    AOTAutograd bypassed its cache for them, so every start re-ran its metadata pass on every
    graph, a compile cache hit or not (13.6 s of a 27.9 s warm start-up on the H200). They only
    set the backend flags, fixed by the graph's own constants, so caching them is sound."""
    import torch._inductor.config as inductor_config

    helpers = ("_backend_from_string", "_cur_sdpa_kernel_backends", "_sdpa_kernel")
    inductor_config.unsafe_marked_cacheable_functions = {
        **inductor_config.unsafe_marked_cacheable_functions,
        **{f"torch.nn.attention.{name}": torch.__version__ for name in helpers}}


def shifted_sigmas(steps: int, image_seq_len: int, config) -> np.ndarray:
    """FLUX.1-dev's resolution-dependent shift of linspace(1, 1/N, N), in float64
    (diffusers casts to float32 before shifting; the reference shifts in float64)."""
    m = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    mu = image_seq_len * m + config["base_shift"] - m * config["base_image_seq_len"]
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    return np.exp(mu) / (np.exp(mu) + (1.0 / sigmas - 1.0))


def import_diffusers() -> None:
    """Import diffusers' classes that the generator uses. It takes seconds (diffusers pulls in
    torch._dynamo, sympy, and transformers' quantizer configs), so a start times it apart from
    building the weights."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: F401
    from diffusers.image_processor import VaeImageProcessor  # noqa: F401


class FluxGenerator:
    def __init__(self, checkpoints: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 random_weights: str | None = None):
        """`random_weights="full"` builds FLUX.1-dev-sized models with random weights on the
        device (GPU tests, benchmarks); the scheduler config still comes from `checkpoints`."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from diffusers.image_processor import VaeImageProcessor

        layout = CheckpointLayout(Path(checkpoints))
        layout.require(layout.scheduler)
        if not random_weights:
            layout.require(layout.transformer, layout.vae, layout.connector, layout.t5_embedder)
        self.layout, self.device, self.dtype = layout, torch.device(device), dtype
        self.native_size = layout.native_size  # sizes follow the model's training size when declared
        self.random_weights = random_weights

        if random_weights:
            self.transformer = full_size.flux_transformer(self.device, dtype)
            self.vae = full_size.flux_vae(self.device, dtype)
        else:
            self.transformer = FluxTransformer2DModel.from_pretrained(layout.transformer, torch_dtype=dtype)
            self.transformer = self.transformer.to(self.device).eval()
            self.vae = AutoencoderKL.from_pretrained(layout.vae, torch_dtype=dtype).to(self.device).eval()
        # Qwen states reach FLUX through its own context_embedder, T5 states through
        # t5_embedder: keep the former apart and feed the transformer finished tokens.
        self.context_embedder = self.transformer.context_embedder
        self.transformer.context_embedder = torch.nn.Identity()
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(layout.scheduler)
        self._scheduler_cls = FlowMatchEulerDiscreteScheduler
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor * 2, vae_latent_channels=self.vae.config.latent_channels,
            do_normalize=False, do_binarize=True, do_convert_grayscale=True)
        self._controlnet = None
        self.speed = SpeedOptions()
        self.compile_cache = None          # compile_cache.CompileCache with --compile-cache
        self.precompiled = None            # precompiled.PrecompiledBlocks when compiled as whole graphs
        self.step_graphs = None            # step_graphs.StepGraphs with CUDA graphs on
        self.startup: dict[str, float] = {}   # seconds of each start-up phase (GetInfo)

        config = self.transformer.config
        if random_weights:
            qwen_hidden, checkpoint_id = full_size.CONNECTOR[0], full_size.CHECKPOINT_ID
        else:
            qwen_hidden, checkpoint_id = load_linear(layout.connector).in_features, layout.checkpoint_id()
        self.fingerprint = pb.ModelFingerprint(
            family="qwen2vl-flux", checkpoint_id=checkpoint_id, qwen_hidden_size=qwen_hidden,
            joint_attention_dim=config.joint_attention_dim,
            inner_dim=config.num_attention_heads * config.attention_head_dim,
            pooled_dim=config.pooled_projection_dim, t5_max_length=T5_MAX_LENGTH)

    # ------------------------------------------------------------ speed

    def optimize(self, options: "SpeedOptions | None" = None) -> None:
        """Apply the speed options once after loading (and to the ControlNet when it loads)."""
        self.speed = options = options or SpeedOptions()
        options.check(self.device)
        if options.cuda_graphs:
            from .step_graphs import StepGraphs

            self.step_graphs = StepGraphs(options.cuda_graphs)
        if options.attention:
            self.transformer.set_attention_backend(options.attention)
        if options.turbo:
            from .fp8 import quantize_linears

            quantize_linears(self.transformer)
        if options.step_cache is not None and options.step_cache.threshold:
            from diffusers import FirstBlockCacheConfig

            self.transformer.enable_cache(FirstBlockCacheConfig(threshold=options.step_cache.threshold))
        if options.compile:
            # Symbolic token counts from the first compile: every size and text length
            # shares one graph per block class, so a new shape does not recompile. The VAE
            # stays eager: compiling its decoder saved 0.045 s a request and cost minutes
            # of start-up with symbolic shapes (BENCHMARKS.md).
            # Python floats static: with symbolic floats Dynamo traced every block graph twice
            # (its scalar pass restarts the analysis), and no float reaching a block varies
            # between requests (timesteps and scales are tensors or outside the blocks).
            torch._dynamo.config.specialize_float = True
            _cache_sdpa_backend_selection()
            blocks.share_single_block_graphs(self.transformer)
            if self._full_graphs:   # (the first-block cache's hooks call diffusers' own forward)
                from .precompiled import PrecompiledBlocks

                self.precompiled = PrecompiledBlocks()
                self._arrange_full_graph_blocks(self.transformer)
            else:
                self.transformer.compile_repeated_blocks(fullgraph=False, dynamic=True)

    @property
    def _full_graphs(self) -> bool:
        """Blocks compile as whole graphs, ahead of time (precompiled.py), except under the
        first-block cache, whose hook on the first block decides outside the graph whether the
        rest runs."""
        return not (self.speed.step_cache is not None and self.speed.step_cache.threshold)

    def _optimize_controlnet(self, controlnet) -> None:
        options = self.speed
        if options.attention:
            controlnet.set_attention_backend(options.attention)
        if options.compile:
            blocks.share_single_block_graphs(controlnet)
            if self.precompiled is not None:
                self._arrange_full_graph_blocks(controlnet)
            else:
                for block in blocks.repeated_blocks(controlnet):
                    block.compile(fullgraph=False, dynamic=True)

    def _arrange_full_graph_blocks(self, model) -> None:
        """The transformer's or the ControlNet's blocks as they compile as whole graphs: fused
        products, strided attention, modulation ahead of the steps, compiled ahead of time."""
        blocks.fuse_products(model)
        blocks.strided_attention(model)
        modulation.install(model)
        self.precompiled.install(model)

    def warm_up(self, modes: list[Mode], size: int = 1024, on_phase: Callable[..., None] | None = None) -> None:
        """Run each mode once (one step) at `size` x `size` so compilation happens before
        health says SERVING, then a variation with batch 2 (torch specialises size 1) and one
        of another shape. Four graphs (two block classes, batch 1 and more) then cover every
        size, text length and mode, the ControlNet's blocks included. `on_phase(name,
        seconds, graphs)` reports each run with the number of graphs traced or loaded in it
        (loaded precompiled from the compile cache on a hit: nothing traced)."""
        cfg, device, dtype = self.fingerprint, self.device, self.dtype
        picture = Image.new("RGB", (size, size), (128, 96, 64))
        cond = Conditioning({"a": torch.randn(1, 512, cfg.joint_attention_dim, device=device, dtype=dtype)},
                            None, torch.randn(1, cfg.pooled_dim, device=device, dtype=dtype))
        other = (size * 3 // 4 // 16 * 16, size * 21 // 16 // 16 * 16)
        runs = [(mode, 1, (size, size)) for mode in modes] + [(Mode.VARIATION, 2, (size, size)),
                                                              (Mode.VARIATION, 1, other)]
        for mode, count, (width, height) in runs:
            given = {"seed": 0, "steps": 1, "image_count": count}
            if mode is Mode.VARIATION:
                given.update(width=width, height=height)
            params, _ = resolve_parameters(mode, given)
            job = GenerationJob(mode, params, cond, init_image=picture, mask=picture.convert("L"),
                                control_maps={"depth": picture, "line": picture})
            start, graphs = time.perf_counter(), self.graphs_obtained()
            with self.step_graphs.unrecorded() if self.step_graphs else contextlib.nullcontext():
                self.generate(job)
            if on_phase is not None:
                on_phase(f"warm-up {mode.value} {width}x{height} x{count}", time.perf_counter() - start,
                         self.graphs_obtained() - graphs)

    def graphs_obtained(self) -> int:
        """Block graphs traced so far (by torch.compile or ahead of time) or loaded precompiled."""
        from torch._dynamo.utils import counters

        precompiled = sum(how == "loaded" for how in self.precompiled.obtained.values()) \
            if self.precompiled is not None else 0
        return counters["stats"]["unique_graphs"] + precompiled

    @property
    def controlnet(self):
        """The union ControlNet, loaded on first use and kept (its context_embedder apart)."""
        if self._controlnet is None:
            # Loaded on the first request, inside its inference mode: leave it, so the weights
            # are ordinary tensors like the transformer's and the compiled block graphs (which
            # guard on that) are shared instead of traced again for the ControlNet.
            with torch.inference_mode(False):
                self._controlnet = self._load_controlnet()
        return self._controlnet

    def _load_controlnet(self):
        from diffusers import FluxControlNetModel

        if self.random_weights:
            controlnet = full_size.flux_controlnet(self.device, self.dtype)
        else:
            self.layout.require(self.layout.controlnet)
            controlnet = FluxControlNetModel.from_pretrained(self.layout.controlnet, torch_dtype=self.dtype)
            controlnet = controlnet.to(self.device).eval()
        self.controlnet_context_embedder = controlnet.context_embedder
        controlnet.context_embedder = torch.nn.Identity()
        self._optimize_controlnet(controlnet)
        return controlnet

    # ------------------------------------------------------------ entry point

    @torch.inference_mode()
    def generate(self, job: GenerationJob, on_step: StepCallback | None = None,
                 cancelled: Callable[[], bool] = lambda: False, preview_every: int = 0) -> list[Image.Image]:
        """One request, any mode. Random draws follow the reference's order with one
        CPU generator: control samples, init-image sample, noise (MODEL_NOTES "Seeds")."""
        mode, params = job.mode, job.params
        count = params["image_count"]
        generator = torch.Generator("cpu").manual_seed(int(params["seed"]))
        corrected = params.get("corrected_controlnet", False)
        start = time.perf_counter()

        # 1. Size: the aspect-ratio table for variation, else image a by the resize rule.
        if mode is Mode.VARIATION:
            width, height = variation_size(params, self.native_size)
        else:
            width, height = generation_size(*job.init_image.size, self.native_size)
        latent_h = 2 * (height // (self.vae_scale_factor * 2))
        latent_w = 2 * (width // (self.vae_scale_factor * 2))

        # 2. Text streams for the transformer (and the ControlNet).
        prompt_embeds, control_embeds = self._text_streams(mode, job.conditioning, count)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        pooled = job.conditioning.pooled.repeat(count, 1)

        # 3. Control maps -> packed latents (ControlNet modes; first random draws).
        controls = []
        if mode.uses_controlnet:
            used = control_maps_used(params)
            for index, (kind, union_mode, scale) in enumerate(used):
                if cancelled():
                    raise Cancelled(f"stopped before encoding control map {index + 1} of {len(used)}")
                cond = self._encode_image(job.control_maps[kind], height, width, generator, count)
                controls.append((self._pack(cond), union_mode, scale))
            if mode is Mode.CONTROLNET_INPAINT and not corrected:
                controls = controls[:1]  # reference quirk: only the first map reaches the ControlNet

        # 4. Timesteps, shortened by strength outside variation.
        image_seq_len = (latent_h // 2) * (latent_w // 2)
        scheduler, timesteps = self._timesteps(params["steps"], image_seq_len, params.get("strength", 1.0))

        # 5. Initial latents: noise, or the init image noised to the first timestep.
        shape = (count, self.transformer.config.in_channels // 4, latent_h, latent_w)
        image_latents = None
        if mode.uses_init_image:
            if cancelled():
                raise Cancelled("stopped before encoding the init image")
            image_latents = self._encode_image(job.init_image, height, width, generator).repeat(count, 1, 1, 1)
        noise = self._noise(shape, generator)
        if image_latents is None or (mode is Mode.CONTROLNET and not corrected):
            latents = noise  # reference quirk in controlnet: the encoded init image is discarded
        else:
            latents = scheduler.scale_noise(image_latents, timesteps[:1].repeat(count), noise)
        latents = self._pack(latents)
        image_ids = self._image_ids(latent_h, latent_w)

        # 6. Inpaint: the mask on the latent grid, and what to keep outside it.
        inpaint = None
        if mode.uses_mask:
            inpaint = (self._mask_latents(job.mask, height, width, latent_h, latent_w, count),
                       self._pack(image_latents), self._pack(noise))
        job.timings["prepare"] = self._seconds_since(start)

        # 7. Denoise.
        start = time.perf_counter()
        latents = self.denoise(latents, timesteps, scheduler, prompt_embeds=prompt_embeds, text_ids=text_ids,
                               pooled=pooled, image_ids=image_ids, guidance=self._guidance(params["guidance"], count),
                               controls=controls, control_embeds=control_embeds, inpaint=inpaint,
                               on_step=on_step, cancelled=cancelled, preview_every=preview_every,
                               latent_size=(latent_h, latent_w))
        job.timings["denoise"] = self._seconds_since(start)

        # 8. Decode.
        if cancelled():
            raise Cancelled("stopped before decoding")
        start = time.perf_counter()
        images = self.decode(latents, latent_h * self.vae_scale_factor, latent_w * self.vae_scale_factor)
        job.timings["decode"] = self._seconds_since(start)
        return images

    def _seconds_since(self, start: float) -> float:
        """Seconds since `start`, once the GPU has run what the stage queued: without it a
        stage's kernels were timed in the next one (a caller without a step callback saw
        0.11 s of denoise in the decode on an H100)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    # ------------------------------------------------------------ steps

    def _text_streams(self, mode: Mode, cond: Conditioning, count: int):
        """context_embedder(qwen) followed by the T5 tokens; in the ControlNet modes the
        ControlNet reads qwen(a) through its own context_embedder, and qwen(a) and
        qwen(b) are truncated to the shorter of the two (reference)."""
        role = transformer_role(mode, set(cond.images))
        tokens = cond.images[role]
        control_tokens = None
        if mode.uses_controlnet:
            control_tokens = cond.images[ROLE_INPUT]
            length = min(tokens.shape[1], control_tokens.shape[1])
            tokens, control_tokens = tokens[:, :length], control_tokens[:, :length]

        def stream(embedder, qwen):
            parts = [embedder(qwen)] + ([cond.prompt] if cond.prompt is not None else [])
            return torch.cat(parts, dim=1).repeat(count, 1, 1)

        prompt_embeds = stream(self.context_embedder, tokens)
        if control_tokens is None:
            return prompt_embeds, None
        self.controlnet  # noqa: B018 - loads the ControlNet and its context_embedder
        return prompt_embeds, stream(self.controlnet_context_embedder, control_tokens)

    def _encode_image(self, image: Image.Image, height: int, width: int, generator,
                      count: int | None = None) -> torch.Tensor:
        """VAE latents of an image as the reference makes them: preprocess (floors to 16),
        `latent_dist.sample(generator)`, then shift and scale.

        Memory layout matters in the last bit: the preprocessor returns a channels-last view,
        and the VAE's convolutions round differently on it than on a contiguous copy. The
        reference encodes the init image in that view (count None), and control maps after
        `repeat_interleave` to the batch (count), which copies them contiguous."""
        from diffusers.pipelines.flux.pipeline_flux_img2img import retrieve_latents

        pixels = self.image_processor.preprocess(image, height=height, width=width)
        if count is not None:
            pixels = pixels.repeat_interleave(count, dim=0)
        pixels = pixels.to(self.device, self.dtype)
        latents = retrieve_latents(self.vae.encode(pixels), generator=generator)
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def _mask_latents(self, mask: Image.Image, height: int, width: int, latent_h: int, latent_w: int,
                      count: int) -> torch.Tensor:
        mask = self.mask_processor.preprocess(mask, height=height, width=width)
        mask = torch.nn.functional.interpolate(mask, size=(latent_h, latent_w)).to(self.device, self.dtype)
        channels = self.transformer.config.in_channels // 4
        return self._pack(mask.repeat(count, channels, 1, 1))

    def _noise(self, shape, generator: torch.Generator) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)

    @staticmethod
    def _pack(latents: torch.Tensor) -> torch.Tensor:
        from diffusers import FluxPipeline

        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)

    def _image_ids(self, latent_h: int, latent_w: int) -> torch.Tensor:
        from diffusers import FluxPipeline

        return FluxPipeline._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, self.device, self.dtype)

    def _timesteps(self, steps: int, image_seq_len: int, strength: float = 1.0):
        scheduler = self._scheduler_cls.from_config(self.scheduler_config, use_dynamic_shifting=False, shift=1.0)
        scheduler.set_timesteps(sigmas=list(shifted_sigmas(steps, image_seq_len, self.scheduler_config)),
                                device=self.device)
        t_start = int(steps - min(steps * strength, steps))
        scheduler.set_begin_index(t_start)
        return scheduler, scheduler.timesteps[t_start:]

    def _guidance(self, scale: float, count: int) -> torch.Tensor | None:
        if not self.transformer.config.guidance_embeds:
            return None
        return torch.full([count], scale, device=self.device, dtype=torch.float32)

    def denoise(self, latents, timesteps, scheduler, *, prompt_embeds, text_ids, pooled, image_ids, guidance,
                controls=(), control_embeds=None, inpaint=None, on_step: StepCallback | None = None,
                cancelled: Callable[[], bool] = lambda: False, preview_every: int = 0,
                latent_size: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """The one denoise core: Euler steps of the flow-matching scheduler, with the
        ControlNet residuals of each control map summed in, and the inpaint blend
        (keep the noised init image outside the mask) after each step. Steps in the
        fixed step cache's schedule reuse the previous velocity."""
        total = len(timesteps)
        progress = _StepReporter(on_step, total, latents.is_cuda)
        if self.transformer.is_cache_enabled:
            self.transformer._reset_stateful_cache()   # the step cache must not leak across requests
        reuse = self.speed.step_cache.skipped(total) if self.speed.step_cache else frozenset()
        if self.step_graphs is not None:
            self.step_graphs.new_request()
        schedule = None
        if modulation.modulated(self.transformer):
            models = [self.transformer] + ([self.controlnet] if controls else [])
            schedule = modulation.ModulationSchedule(models, timesteps, pooled=pooled, guidance=guidance,
                                                     dtype=latents.dtype,
                                                     fixed_addresses=self.step_graphs is not None)
        noise_pred = None
        try:
            for i, t in enumerate(timesteps):
                if cancelled():
                    raise Cancelled(f"stopped before step {i + 1} of {total}")
                if noise_pred is None or i not in reuse:
                    if schedule is not None:
                        schedule.select(i)
                    noise_pred = self._velocity(latents, t, prompt_embeds=prompt_embeds, text_ids=text_ids,
                                                pooled=pooled, image_ids=image_ids, guidance=guidance,
                                                controls=controls, control_embeds=control_embeds)
                preview = None
                if preview_every and (i + 1) % preview_every == 0:
                    # The clean image the model predicts now: x0 = x_t - sigma * v (flow matching).
                    sigma = scheduler.sigmas[scheduler.begin_index + i]   # step_index is None before the first step
                    preview = self._preview(latents - sigma * noise_pred, *latent_size)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if inpaint is not None:
                    mask, image_latents, noise = inpaint
                    keep = image_latents
                    if i < total - 1:
                        keep = scheduler.scale_noise(image_latents, timesteps[i + 1:i + 2], noise)
                    latents = (1 - mask) * keep + mask * latents
                progress.step_launched(i + 1, preview)
        finally:
            if schedule is not None:
                schedule.release()
        progress.finish()
        return latents

    def _velocity(self, latents, t, *, prompt_embeds, text_ids, pooled, image_ids, guidance, controls,
                  control_embeds) -> torch.Tensor:
        """One transformer call at timestep t, with the ControlNet residuals of every map summed
        in: a CUDA graph's replay when graphs are on (the maps' modes and scales are its constants)."""
        inputs = dict(latents=latents, timestep=t.expand(latents.shape[0]).to(latents.dtype) / 1000,
                      prompt_embeds=prompt_embeds, text_ids=text_ids, pooled=pooled, image_ids=image_ids,
                      guidance=guidance, control_conds=[cond for cond, _, _ in controls],
                      control_embeds=control_embeds)
        settings = tuple((union_mode, scale) for _, union_mode, scale in controls)
        call = functools.partial(self._transformer_call, settings)
        if self.step_graphs is None:
            return call(**inputs)
        return self.step_graphs.run(call, settings, inputs)

    def _transformer_call(self, settings, *, latents, timestep, prompt_embeds, text_ids, pooled, image_ids,
                          guidance, control_conds, control_embeds) -> torch.Tensor:
        block_samples = single_samples = None   # the ControlNet's residuals, summed over the maps
        for cond, (union_mode, scale) in zip(control_conds, settings):
            mode = torch.full((latents.shape[0], 1), union_mode, device=self.device, dtype=torch.long)
            b, s = self.controlnet(
                hidden_states=latents, controlnet_cond=cond, controlnet_mode=mode, conditioning_scale=scale,
                timestep=timestep, guidance=guidance, pooled_projections=pooled,
                encoder_hidden_states=control_embeds, txt_ids=text_ids, img_ids=image_ids, return_dict=False)
            block_samples = b if block_samples is None else [x + y for x, y in zip(block_samples, b)]
            single_samples = s if single_samples is None else [x + y for x, y in zip(single_samples, s)]
        with self.transformer.cache_context("cond"):   # a no-op unless the first-block cache is on
            return self.transformer(
                hidden_states=latents, timestep=timestep, guidance=guidance, pooled_projections=pooled,
                encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=image_ids,
                controlnet_block_samples=block_samples, controlnet_single_block_samples=single_samples,
                return_dict=False,
            )[0]

    def _preview(self, latents: torch.Tensor, latent_h: int, latent_w: int) -> Image.Image:
        """A quarter-size preview of the first image: latents pooled 4x, then the VAE."""
        from diffusers import FluxPipeline

        grid = FluxPipeline._unpack_latents(latents[:1], latent_h * self.vae_scale_factor,
                                            latent_w * self.vae_scale_factor, self.vae_scale_factor)
        grid = torch.nn.functional.avg_pool2d(grid, 4) if min(grid.shape[-2:]) >= 8 else grid
        grid = grid / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self.image_processor.postprocess(self.vae.decode(grid, return_dict=False)[0], output_type="pil")[0]

    def decode(self, latents: torch.Tensor, height: int, width: int) -> list[Image.Image]:
        from diffusers import FluxPipeline

        latents = FluxPipeline._unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="pil")
