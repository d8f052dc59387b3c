"""The bench's FLOP count of a FLUX step (bench/flops.py), against torch's own count of a real
forward: MFU and every floor in BENCHMARKS.md divide by it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from flops import FLUX_DEV, transformer_step_flops  # noqa: E402


@pytest.mark.parametrize("image,text,batch", [(64, 24, 1), (48, 40, 2)])
def test_step_flops_match_a_real_forward(image, text, batch):
    from diffusers import FluxTransformer2DModel

    config = dict(FLUX_DEV, num_layers=2, num_single_layers=3, num_attention_heads=2, attention_head_dim=16,
                  pooled_projection_dim=24)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), **config).eval()
    model.context_embedder = torch.nn.Identity()   # as the generator runs it
    inputs = dict(hidden_states=torch.randn(batch, image, 64), encoder_hidden_states=torch.randn(batch, text, 32),
                  pooled_projections=torch.randn(batch, 24), timestep=torch.full([batch], 0.5),
                  guidance=torch.full([batch], 3.5), txt_ids=torch.zeros(text, 3), img_ids=torch.zeros(image, 3))
    # the math backend spells attention as matmuls, which the counter sees on any device
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**inputs)
    counted = counter.get_flop_counts()["Global"]
    attention = sum(v for op, v in counted.items() if "bmm" in str(op))
    ours = transformer_step_flops(config, image, text, batch)
    assert ours["attention"] == attention
    assert ours["total"] == counter.get_total_flops()


def test_flux_dev_step_at_1024():
    """4096 image + 512 text tokens: the figure BENCHMARKS.md's MFU column divides by."""
    flops = transformer_step_flops(FLUX_DEV, 4096, 512)
    assert round(flops["total"] / 1e12, 1) == 74.4
    assert round(flops["attention"] / 1e12, 1) == 14.9
