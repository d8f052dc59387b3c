"""The tiny preset: the real architectures with tiny random weights, written in
the published checkpoint layout so the same loading code serves both.

Every dimension differs from every other one (Qwen hidden 64, connector out 48,
FLUX width 32, T5 width 40, CLIP width 24) so a mixed-up dimension fails loudly.
Tokenizers are built here from a small corpus; nothing is downloaded. A `Preset`
changes the sizes: the trained demo model (training/train.py) is a wider one.
"""
from __future__ import annotations

import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import CheckpointLayout
from .tiny_control import write_tiny_control_weights

SEED = 20261126



@dataclass(frozen=True)
class Preset:
    """Sizes of a preset; the defaults are the test preset. Qwen, T5 and CLIP stay tiny in
    every preset (the demo keeps them frozen and random), only what is trained grows."""

    qwen_hidden: int = 64
    joint_attention_dim: int = 48       # connector output = FLUX context_embedder input
    flux_heads: int = 2
    flux_head_dim: int = 16
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)   # sums to flux_head_dim
    flux_layers: int = 1
    flux_single_layers: int = 2
    controlnet_layers: int = 1
    controlnet_single_layers: int = 1
    t5_width: int = 40
    t5_vocab: int = 90
    clip_width: int = 24
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)
    vae_norm_groups: int = 4
    corpus: tuple[str, ...] = ()        # extra tokenizer training sentences

    @property
    def inner_dim(self) -> int:
        return self.flux_heads * self.flux_head_dim


TINY = Preset()

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

# The chat template published with Qwen2-VL-7B-Instruct.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.", "Describe this image.", "system user assistant",
    "a red circle on a blue background", "a green square on a white background",
    "a yellow triangle on a black background", "stripes and gradients in purple and orange",
    "a photo of a cat sitting on a wooden table", "a painting of mountains at sunset",
]


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False,
            "single_word": False, "special": True}


def _qwen_tokenizer(out: Path) -> dict[str, int]:
    """Byte-level BPE in Qwen2's file format: vocab.json + merges.txt (slow) and tokenizer.json (fast)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=420, special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    with tempfile.TemporaryDirectory() as tmp:
        bpe.model.save(tmp)
        vocab = json.loads(Path(tmp, "vocab.json").read_text())
        shutil.copy(Path(tmp, "vocab.json"), out / "vocab.json")
        shutil.copy(Path(tmp, "merges.txt"), out / "merges.txt")
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768, "errors": "replace",
        "add_prefix_space": False, "split_special_tokens": False,
        "bos_token": None, "unk_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "added_tokens_decoder": {str(vocab[t]): _special(t) for t in QWEN_SPECIAL_TOKENS},
        "chat_template": QWEN2_VL_CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", config)
    AutoTokenizer.from_pretrained(out).save_pretrained(out)  # adds tokenizer.json, as published
    # save_pretrained drops added_tokens_decoder; the published config keeps it, and
    # loaders that only read vocab.json + merges.txt need it.
    _write_json(out / "tokenizer_config.json", config)
    return {t: vocab[t] for t in QWEN_SPECIAL_TOKENS}


def _t5_tokenizer(out: Path, preset: Preset) -> int:
    """A sentencepiece unigram model (spiece.model) plus its tokenizer.json, as FLUX ships them."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((_CORPUS + list(preset.corpus)) * 8), model_writer=model,
        vocab_size=preset.t5_vocab,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spiece.model").write_bytes(model.getvalue())
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0,
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
    })
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.save_pretrained(out)
    return len(tokenizer)


def _clip_tokenizer(out: Path) -> dict[str, int]:
    """CLIP's BPE files (vocab.json + merges.txt, no tokenizer.json), as FLUX ships them."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    _write_json(out / "vocab.json", vocab)
    (out / "merges.txt").write_text("#version: 0.2\n")
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
    })
    return {"vocab_size": len(vocab), "bos": vocab["<|startoftext|>"], "eos": vocab["<|endoftext|>"]}


def _qwen2_vl(out: Path, special: dict[str, int], preset: Preset) -> None:
    """Qwen2-VL without lm_head, saved with the legacy key names (`visual.*`, `model.*`)
    and the flat legacy config, as the published checkpoint has them."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLModel

    vocab_size = max(special.values()) + 1
    vocab_size = max(vocab_size, len(json.loads((out / "vocab.json").read_text())))
    flat = {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": preset.qwen_hidden, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vocab_size": vocab_size, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_cache": True, "attention_dropout": 0.0,
        "bos_token_id": special["<|endoftext|>"], "eos_token_id": special["<|im_end|>"],
        "image_token_id": special["<|image_pad|>"], "video_token_id": special["<|video_pad|>"],
        "vision_start_token_id": special["<|vision_start|>"],
        "vision_end_token_id": special["<|vision_end|>"],
        "vision_config": {
            "depth": 2, "embed_dim": 32, "hidden_size": preset.qwen_hidden, "hidden_act": "quick_gelu",
            "mlp_ratio": 2, "num_heads": 2, "in_chans": 3, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
    }
    torch.manual_seed(SEED)
    model = Qwen2VLModel(Qwen2VLConfig(**flat)).eval()
    legacy = {}
    for key, value in model.state_dict().items():
        if key.startswith("language_model."):
            key = "model." + key[len("language_model."):]
        legacy[key] = value.contiguous()
    save_file(legacy, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", flat)
    _write_json(out / "preprocessor_config.json", {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    })
    _write_json(out / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})


def _linear_state(in_features: int, out_features: int, prefix: str = "") -> dict[str, torch.Tensor]:
    layer = torch.nn.Linear(in_features, out_features)
    return {prefix + k: v.detach().clone() for k, v in layer.state_dict().items()}


def make_tiny_checkpoints(root: str | Path, preset: Preset = TINY) -> Path:
    """Write a complete tiny checkpoint directory; deterministic for a given library version."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler,
                           FluxControlNetModel, FluxTransformer2DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    layout = CheckpointLayout(Path(root))
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.qwen.mkdir(parents=True, exist_ok=True)

    special = _qwen_tokenizer(layout.qwen)
    _qwen2_vl(layout.qwen, special, preset)
    torch.manual_seed(SEED + 1)
    # The published connector was saved from a DataParallel wrapper: keep the prefix.
    torch.save(_linear_state(preset.qwen_hidden, preset.joint_attention_dim, "module.linear."), layout.connector)
    torch.save(_linear_state(preset.t5_width, preset.inner_dim), layout.t5_embedder)

    t5_vocab = _t5_tokenizer(layout.t5_tokenizer, preset)
    torch.manual_seed(SEED + 2)
    T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=preset.t5_width, d_kv=8, d_ff=64, num_layers=1, num_heads=5,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
    )).save_pretrained(layout.t5)

    clip = _clip_tokenizer(layout.clip_tokenizer)
    torch.manual_seed(SEED + 3)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=clip["vocab_size"], hidden_size=preset.clip_width, intermediate_size=48,
        projection_dim=preset.clip_width, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=clip["bos"], eos_token_id=clip["eos"],
        pad_token_id=clip["eos"], hidden_act="quick_gelu",
    )).save_pretrained(layout.clip)

    flux_dims = dict(
        patch_size=1, in_channels=64, attention_head_dim=preset.flux_head_dim,
        num_attention_heads=preset.flux_heads, joint_attention_dim=preset.joint_attention_dim,
        pooled_projection_dim=preset.clip_width, guidance_embeds=True,
        axes_dims_rope=preset.axes_dims_rope,
    )
    torch.manual_seed(SEED + 4)
    FluxTransformer2DModel(num_layers=preset.flux_layers, num_single_layers=preset.flux_single_layers,
                           **flux_dims).save_pretrained(layout.transformer)
    torch.manual_seed(SEED + 5)
    controlnet = FluxControlNetModel(num_layers=preset.controlnet_layers,
                                     num_single_layers=preset.controlnet_single_layers, num_mode=10, **flux_dims)
    # diffusers zero-initialises the ControlNet's output projections (a fresh
    # ControlNet must not disturb FLUX); random ones let tests see the maps' effect.
    for name in ("controlnet_blocks", "controlnet_single_blocks"):
        for layer in getattr(controlnet, name):
            layer.reset_parameters()
    controlnet.controlnet_x_embedder.reset_parameters()
    controlnet.save_pretrained(layout.controlnet)
    torch.manual_seed(SEED + 6)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=preset.vae_channels, layers_per_block=1, norm_num_groups=preset.vae_norm_groups,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False, sample_size=64,
    ).save_pretrained(layout.vae)
    FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    ).save_pretrained(layout.scheduler)
    write_tiny_control_weights(layout, SEED + 7)
    return layout.root
