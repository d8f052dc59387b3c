"""Full-size architectures with random weights, built directly on the device.

For GPU tests and benchmarks without the real weights: the same shapes, FLOPs and
memory as Qwen2-VL-7B, T5-XXL, CLIP-L, FLUX.1-dev, its union ControlNet and VAE.
Tokenizers, processor and scheduler configs still come from a checkpoint directory
(the tiny preset is enough): they decide lengths, not costs. `--random-weights full`
on both servers selects this. The sizes are read at call time, so tests can shrink
them (tests/test_full_size.py).
"""
from __future__ import annotations

import contextlib

import torch

CHECKPOINT_ID = "random-full-size"
SEED = 1234

QWEN2_VL_7B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064, "tie_word_embeddings": False, "attention_dropout": 0.0,
    "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "hidden_act": "quick_gelu",
                      "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "patch_size": 14,
                      "spatial_merge_size": 2, "temporal_patch_size": 2},
}
T5_XXL_ENCODER = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
                   num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                   hidden_act="quick_gelu")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_CONTROLNET_UNION = dict(FLUX_DEV, num_layers=5, num_single_layers=10, num_mode=10)
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, sample_size=1024)
CONNECTOR = (3584, 4096)
T5_EMBEDDER = (4096, 3072)


@contextlib.contextmanager
def building(device, dtype: torch.dtype, seed: int):
    """Parameters are created on `device` in `dtype` (a 12 B model never exists in fp32)."""
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def qwen2_vl(device, dtype, special_ids: dict[str, int]):
    """Qwen2-VL with the token ids of the tokenizer in use (the tiny preset's)."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    flat = dict(QWEN2_VL_7B, **special_ids)
    qwen_config = Qwen2VLConfig(**flat)
    qwen_config._attn_implementation = "sdpa"
    qwen_config.vision_config._attn_implementation = "eager"
    qwen_config.text_config._attn_implementation = "sdpa"
    with building(device, dtype, SEED):
        return Qwen2VLModel(qwen_config).eval()


def t5_encoder(device, dtype):
    from transformers import T5Config, T5EncoderModel

    t5_config = T5Config(**T5_XXL_ENCODER)
    t5_config._attn_implementation = "eager"
    with building(device, dtype, SEED + 1):
        return T5EncoderModel(t5_config).eval()


def clip_text(device, dtype, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    with building(device, dtype, SEED + 2):
        return CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)).eval()


def linear(device, dtype, features: tuple[int, int], seed: int) -> torch.nn.Linear:
    with building(device, dtype, seed):
        return torch.nn.Linear(*features).eval()


def flux_transformer(device, dtype):
    from diffusers import FluxTransformer2DModel

    with building(device, dtype, SEED + 3):
        return FluxTransformer2DModel(**FLUX_DEV).eval()


def flux_controlnet(device, dtype):
    from diffusers import FluxControlNetModel

    with building(device, dtype, SEED + 4):
        controlnet = FluxControlNetModel(**FLUX_CONTROLNET_UNION)
        for name in ("controlnet_blocks", "controlnet_single_blocks"):
            for layer in getattr(controlnet, name):
                layer.reset_parameters()   # zero-initialised by diffusers; a trained one is not
        controlnet.controlnet_x_embedder.reset_parameters()
        return controlnet.eval()


def flux_vae(device, dtype):
    from diffusers import AutoencoderKL

    with building(device, dtype, SEED + 5):
        return AutoencoderKL(**FLUX_VAE).eval()
