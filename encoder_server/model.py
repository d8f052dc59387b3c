"""The encoder half of Qwen2VL-Flux: Qwen2-VL image states (+focus) through the
connector, T5 prompt states through t5_embedder, CLIP pooled of "". No gRPC here."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

from qwen2vl_flux.checkpoints import CheckpointError, CheckpointLayout, full_size
from qwen2vl_flux.checkpoints.projections import load_linear
from qwen2vl_flux.client.modes import T5_MAX_LENGTH, Focus
from qwen2vl_flux.serving.server import Cancelled
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb

from .control_maps import ControlMapper, denoise_map

# The reference's one user turn; Qwen2-VL is causal, so the image rows depend on
# the prefix (system prompt included) and the image, not on this trailing text.
QWEN_MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
CLIP_MAX_LENGTH = 77
QWEN_SPECIAL_IDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                    "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                    "bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>"}
# Qwen2-VL's text attention leaves out cuDNN: cuDNN builds a plan for every new sequence length,
# which cost the first image of each new image-token count 40-500 ms on an H200 (bench/probe.py
# --sections shapes). Flash attention has no per-length set-up. The CPU picks flash or math either way.
TEXT_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class ImageEncoding:
    role: str
    tokens: torch.Tensor          # (1, N, joint_attention_dim), unpadded
    grid_thw: tuple[int, int, int]
    focus: Focus | None
    pixel_budget: int


def focus_weights(grid_h: int, grid_w: int, focus: Focus) -> torch.Tensor:
    """A = clip(1 - dist / (radius * min(H', W')), 0, 1) on the merged token grid,
    dist from (center_x*W', center_y*H') on the integer grid; float64 like the reference."""
    ys = torch.arange(grid_h, dtype=torch.float64).view(grid_h, 1)
    xs = torch.arange(grid_w, dtype=torch.float64).view(1, grid_w)
    dist = torch.sqrt((xs - focus.center_x * grid_w) ** 2 + (ys - focus.center_y * grid_h) ** 2)
    return torch.clamp(1.0 - dist / (focus.radius * min(grid_h, grid_w)), 0.0, 1.0)


class Qwen2VLFluxEncoder:
    def __init__(self, checkpoints: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 random_weights: str | None = None):
        """`random_weights="full"` builds full-size models with random weights on the device
        (GPU tests, benchmarks); tokenizers and processor still come from `checkpoints`."""
        from transformers import AutoTokenizer, CLIPTextModel, Qwen2VLModel, T5EncoderModel
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        layout = CheckpointLayout(Path(checkpoints))
        layout.require(layout.qwen, layout.t5_tokenizer, layout.clip_tokenizer)
        if not random_weights:
            layout.require(layout.connector, layout.t5_embedder, layout.t5, layout.clip)
        self.device, self.dtype, self.layout = torch.device(device), dtype, layout

        self.tokenizer = AutoTokenizer.from_pretrained(layout.qwen)
        # The PIL backend matches the reference's pixel values exactly (torchvision's does not).
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(layout.qwen)
        self.prompt_text = self.tokenizer.apply_chat_template(
            QWEN_MESSAGES, chat_template=self._chat_template(), tokenize=False, add_generation_prompt=True)
        self.t5_tokenizer = AutoTokenizer.from_pretrained(layout.t5_tokenizer)
        clip_tokenizer = AutoTokenizer.from_pretrained(layout.clip_tokenizer)
        if random_weights:
            special = {name: self.tokenizer.convert_tokens_to_ids(token) for name, token in QWEN_SPECIAL_IDS.items()}
            self.qwen = full_size.qwen2_vl(self.device, dtype, special)
            self.t5 = full_size.t5_encoder(self.device, dtype)
            clip = full_size.clip_text(self.device, dtype, clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id)
            self.connector = full_size.linear(self.device, dtype, full_size.CONNECTOR, full_size.SEED + 10)
            self.t5_embedder = full_size.linear(self.device, dtype, full_size.T5_EMBEDDER, full_size.SEED + 11)
            checkpoint_id = full_size.CHECKPOINT_ID
        else:
            # Eager vision attention and eager T5 reproduce the reference bit for bit (MODEL_NOTES).
            self.qwen = Qwen2VLModel.from_pretrained(
                layout.qwen, dtype=dtype, attn_implementation={"text_config": "sdpa", "vision_config": "eager"},
            ).to(self.device).eval()
            qwen_hidden = self.qwen.config.text_config.hidden_size
            self.connector = load_linear(layout.connector, expect_in=qwen_hidden).to(self.device, dtype).eval()
            self.t5 = T5EncoderModel.from_pretrained(layout.t5, dtype=dtype, attn_implementation="eager")
            self.t5 = self.t5.to(self.device).eval()
            self.t5_embedder = load_linear(layout.t5_embedder, expect_in=self.t5.config.d_model)
            self.t5_embedder = self.t5_embedder.to(self.device, dtype).eval()
            clip = CLIPTextModel.from_pretrained(layout.clip, dtype=dtype).to(self.device).eval()
            checkpoint_id = layout.checkpoint_id()
        self.image_token_id = self.qwen.config.image_token_id
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        if self.prompt_text.count(self.image_token) != 1:
            raise CheckpointError(f"{layout.qwen}: the chat template does not place one {self.image_token}")

        # The prompt never reaches CLIP: its pooled output of "" is a constant,
        # computed once here; CLIP is then released.
        ids = clip_tokenizer([""], padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                             return_tensors="pt").input_ids
        with torch.inference_mode():
            self.pooled = clip(ids.to(self.device), output_hidden_states=False).pooler_output.clone()
        del clip

        # The reference runs Depth Anything and MTEED in float32 whatever the model dtype.
        self.control = ControlMapper(layout, device=self.device, dtype=torch.float32)
        self.fingerprint = pb.ModelFingerprint(
            family="qwen2vl-flux", checkpoint_id=checkpoint_id, qwen_hidden_size=self.connector.in_features,
            joint_attention_dim=self.connector.out_features, inner_dim=self.t5_embedder.out_features,
            pooled_dim=self.pooled.shape[-1], t5_max_length=T5_MAX_LENGTH)

    def _chat_template(self) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.chat_template
        for name in ("chat_template.jinja", "chat_template.json"):
            path = self.layout.qwen / name
            if path.exists():
                text = path.read_text()
                return json.loads(text)["chat_template"] if name.endswith(".json") else text
        raise CheckpointError(f"{self.layout.qwen} has no chat template (tokenizer_config.json, "
                              "chat_template.jinja or chat_template.json)")

    @torch.inference_mode()
    def qwen_states(self, image: Image.Image, budget: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Final-layer Qwen2-VL states at the image-pad positions: (1, N, hidden)."""
        features = self.image_processor(images=[image], size={"shortest_edge": budget, "longest_edge": budget},
                                        return_tensors="pt")
        grid = features["image_grid_thw"]
        count = int(grid.prod()) // self.image_processor.merge_size ** 2
        text = self.prompt_text.replace(self.image_token, self.image_token * count, 1)
        input_ids = self.tokenizer(text, return_tensors="pt").input_ids.to(self.device)
        is_image = input_ids == self.image_token_id
        with sdpa_kernel(TEXT_ATTENTION):
            hidden = self.qwen(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                pixel_values=features["pixel_values"].to(self.device, self.dtype),
                image_grid_thw=grid.to(self.device), mm_token_type_ids=is_image.to(torch.int32),
                use_cache=False,
            ).last_hidden_state
        t, h, w = (int(v) for v in grid[0])
        return hidden[is_image].unsqueeze(0), (t, h, w)

    @torch.inference_mode()
    def encode_image(self, role: str, image: Image.Image, focus: Focus | None, budget: int) -> ImageEncoding:
        states, (t, h, w) = self.qwen_states(image, budget)
        if focus is not None:
            merge = self.image_processor.merge_size
            gh, gw = h // merge, w // merge
            weights = focus_weights(gh, gw, focus).to(self.device, states.dtype)
            states = states.view(1, gh, gw, -1) * weights[None, :, :, None]
            states = states.view(1, gh * gw, -1)
        return ImageEncoding(role, self.connector(states), (t, h, w), focus, budget)

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        # Padded to 256 with no attention mask, as the reference does: the pad
        # tokens' states are part of the conditioning.
        ids = self.t5_tokenizer([prompt], padding="max_length", max_length=T5_MAX_LENGTH, truncation=True,
                                return_tensors="pt").input_ids.to(self.device)
        return self.t5_embedder(self.t5(ids).last_hidden_state)

    def encode_parts(self, images: list[tuple[str, Image.Image, Focus | None]], prompt: str | None,
                     budget: int, cancelled: Callable[[], bool] = lambda: False,
                     ) -> tuple[list[ImageEncoding], torch.Tensor | None]:
        """The images' embeddings and, when a prompt is given, its T5 tokens; `cancelled`
        is asked before each stage (the caller may have gone away)."""
        encodings = []
        with self._interruptible(cancelled):
            for index, (role, image, focus) in enumerate(images):
                if cancelled():
                    raise Cancelled(f"stopped before encoding image {index + 1} of {len(images)}")
                encodings.append(self.encode_image(role, image, focus, budget))
            if prompt and cancelled():
                raise Cancelled("stopped before encoding the prompt")
            return encodings, self.encode_prompt(prompt) if prompt else None

    @contextlib.contextmanager
    def _interruptible(self, cancelled: Callable[[], bool]):
        """Also ask `cancelled` before every Qwen2-VL vision block and decoder layer: a large
        image budget makes one forward pass long enough to be worth stopping inside."""
        def check(module, args):
            if cancelled():
                raise Cancelled(f"stopped inside the Qwen2-VL forward pass ({type(module).__name__})")

        layers = [*getattr(getattr(self.qwen, "visual", None), "blocks", []),
                  *getattr(getattr(self.qwen, "language_model", None), "layers", [])]
        hooks = [layer.register_forward_pre_hook(check) for layer in layers]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def control_maps(self, image: Image.Image, kinds: list[str], line_detector: str = "auto",
                     denoise_radius: float | None = None, cancelled: Callable[[], bool] = lambda: False,
                     ) -> list[tuple[str, Image.Image, str]]:
        """(kind, map, what made it) for each kind asked, optionally blurred."""
        maps = []
        for kind in kinds:
            if cancelled():
                raise Cancelled(f"stopped before the {kind} map")
            if kind == "depth":
                picture, used = self.control.depth(image), "depth-anything-v2"
            else:
                picture, used = self.control.line(image, line_detector)
            if denoise_radius:
                picture = denoise_map(picture, denoise_radius)
            maps.append((kind, picture, used))
        return maps
