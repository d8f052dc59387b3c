"""The `--random-weights full` path (GPU tests and benchmarks), exercised on the CPU with
the full-size configs shrunk: same code, tiny numbers."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from qwen2vl_flux.checkpoints import full_size
from qwen2vl_flux.client.modes import Mode, resolve_parameters


@pytest.fixture
def shrunk(monkeypatch):
    qwen = dict(full_size.QWEN2_VL_7B, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                vision_config=dict(full_size.QWEN2_VL_7B["vision_config"], depth=1, embed_dim=32, num_heads=2,
                                   hidden_size=64))
    monkeypatch.setattr(full_size, "QWEN2_VL_7B", qwen)
    monkeypatch.setattr(full_size, "T5_XXL_ENCODER", dict(full_size.T5_XXL_ENCODER, vocab_size=128, d_model=40,
                                                          d_kv=8, d_ff=64, num_layers=1, num_heads=5))
    monkeypatch.setattr(full_size, "CLIP_L_TEXT", dict(full_size.CLIP_L_TEXT, vocab_size=600, hidden_size=24,
                                                       intermediate_size=48, projection_dim=24,
                                                       num_hidden_layers=1, num_attention_heads=2))
    flux = dict(full_size.FLUX_DEV, num_layers=1, num_single_layers=1, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
    monkeypatch.setattr(full_size, "FLUX_DEV", flux)
    monkeypatch.setattr(full_size, "FLUX_CONTROLNET_UNION", dict(flux, num_mode=10))
    monkeypatch.setattr(full_size, "FLUX_VAE", dict(full_size.FLUX_VAE, block_out_channels=(8, 8, 16, 16),
                                                    layers_per_block=1, norm_num_groups=4))
    monkeypatch.setattr(full_size, "CONNECTOR", (64, 48))
    monkeypatch.setattr(full_size, "T5_EMBEDDER", (40, 32))


def test_random_full_size_path_runs_every_piece(shrunk, tiny_checkpoints):
    from qwen2vl_flux.encoder_server.model import Qwen2VLFluxEncoder
    from qwen2vl_flux.generator_server.pipeline import (Conditioning, FluxGenerator, GenerationJob, SpeedOptions,
                                                        StepCache)

    encoder = Qwen2VLFluxEncoder(tiny_checkpoints, random_weights="full")
    generator = FluxGenerator(tiny_checkpoints, random_weights="full")
    assert encoder.fingerprint == generator.fingerprint
    assert encoder.fingerprint.checkpoint_id == full_size.CHECKPOINT_ID
    assert all(p.dtype == torch.float32 for p in generator.transformer.parameters())

    generator.optimize(SpeedOptions(step_cache=StepCache(threshold=0.05)))
    generator.warm_up([Mode.VARIATION, Mode.CONTROLNET], size=32)
    picture = Image.new("RGB", (64, 48), (200, 30, 30))
    encodings, prompt = encoder.encode_parts([("a", picture, None)], "a red circle", 256 * 28 * 28)
    cond = Conditioning({"a": encodings[0].tokens}, prompt, encoder.pooled)
    params, _ = resolve_parameters(Mode.CONTROLNET, {"seed": 1, "steps": 2})
    images = generator.generate(GenerationJob(Mode.CONTROLNET, params, cond, init_image=picture,
                                              control_maps={"depth": picture, "line": picture}))
    assert [im.size for im in images] == [(64, 48)]


def test_qwen_text_attention_runs_without_cudnn(tiny_checkpoints):
    """cuDNN's attention builds a plan for every new sequence length (40-500 ms for each new image-token
    count on an H200), so the encoder's Qwen2-VL text attention runs without it, and the process's
    own choice of backends is left as it was."""
    from qwen2vl_flux.encoder_server.model import Qwen2VLFluxEncoder

    encoder = Qwen2VLFluxEncoder(tiny_checkpoints)
    backends = []
    attention = encoder.qwen.language_model.layers[0].self_attn
    attention.register_forward_pre_hook(lambda module, args: backends.append(
        (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled())))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    encoder.encode_image("a", Image.new("RGB", (96, 64), (20, 90, 160)), None, 256 * 28 * 28)
    assert backends == [(False, True)]
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
