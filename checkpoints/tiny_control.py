"""Tiny control-map weights for the tiny preset: a Depth Anything V2 in the ORIGINAL .pth format
(DINOv2 `pretrained.*` + DPT `depth_head.*` key names, as published) and an MTEED.pth with the real
TEED architecture, both random from a seed. Output is noise; it proves the loading and the maps.

The depth state dict is written from the original code's shapes (depth_anything_v2/dpt.py,
dinov2.py), not from transformers, so loading it exercises the key conversion for real.
Dimensions all differ (embed 64, 4 blocks, MLP 128, DPT out channels 8/12/16/24, features 8,
position grid 8x8) so a mixed-up dimension fails loudly. About 0.8 MB + 0.24 MB.
"""
from __future__ import annotations

import math

import torch

from . import CheckpointLayout

DEPTH_EMBED = 64          # heads = 64 // 64 = 1
DEPTH_BLOCKS = 4
DEPTH_MLP = 128
DEPTH_PATCH = 14
DEPTH_GRID = 8            # pos_embed covers 8x8 patches (img_size 112); interpolated at run time
DEPTH_OUT_CHANNELS = (8, 12, 16, 24)
DEPTH_FEATURES = 8
DEPTH_HEAD_HIDDEN = 32    # head_features_2, fixed in the original DPTHead


def _normal(g: torch.Generator, *shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std + mean


def _conv(g: torch.Generator, sd: dict, name: str, cout: int, cin: int, k: int, bias: bool = True,
          transpose: bool = False) -> None:
    fan = cin * k * k
    shape = (cin, cout, k, k) if transpose else (cout, cin, k, k)
    sd[f"{name}.weight"] = _normal(g, *shape, std=math.sqrt(2.0 / fan))
    if bias:
        sd[f"{name}.bias"] = _normal(g, cout, std=0.05)


def _linear(g: torch.Generator, sd: dict, name: str, cout: int, cin: int) -> None:
    sd[f"{name}.weight"] = _normal(g, cout, cin, std=1.0 / math.sqrt(cin))
    sd[f"{name}.bias"] = _normal(g, cout, std=0.02)


def _layer_norm(g: torch.Generator, sd: dict, name: str, dim: int) -> None:
    sd[f"{name}.weight"] = _normal(g, dim, std=0.1, mean=1.0)
    sd[f"{name}.bias"] = _normal(g, dim, std=0.05)


def tiny_depth_anything_state(seed: int) -> dict[str, torch.Tensor]:
    """Original-format state dict of DepthAnythingV2(encoder=<tiny ViT>, features, out_channels)."""
    g = torch.Generator().manual_seed(seed)
    e, sd = DEPTH_EMBED, {}
    sd["pretrained.cls_token"] = _normal(g, 1, 1, e)
    sd["pretrained.pos_embed"] = _normal(g, 1, DEPTH_GRID * DEPTH_GRID + 1, e, std=0.5)
    sd["pretrained.mask_token"] = torch.zeros(1, e)
    _conv(g, sd, "pretrained.patch_embed.proj", e, 3, DEPTH_PATCH)
    for i in range(DEPTH_BLOCKS):
        b = f"pretrained.blocks.{i}"
        _layer_norm(g, sd, f"{b}.norm1", e)
        _linear(g, sd, f"{b}.attn.qkv", 3 * e, e)
        _linear(g, sd, f"{b}.attn.proj", e, e)
        sd[f"{b}.ls1.gamma"] = _normal(g, e, std=0.1, mean=0.5)
        _layer_norm(g, sd, f"{b}.norm2", e)
        _linear(g, sd, f"{b}.mlp.fc1", DEPTH_MLP, e)
        _linear(g, sd, f"{b}.mlp.fc2", e, DEPTH_MLP)
        sd[f"{b}.ls2.gamma"] = _normal(g, e, std=0.1, mean=0.5)
    _layer_norm(g, sd, "pretrained.norm", e)

    oc, f = DEPTH_OUT_CHANNELS, DEPTH_FEATURES
    for i, c in enumerate(oc):
        _conv(g, sd, f"depth_head.projects.{i}", c, e, 1)
    _conv(g, sd, "depth_head.resize_layers.0", oc[0], oc[0], 4, transpose=True)
    _conv(g, sd, "depth_head.resize_layers.1", oc[1], oc[1], 2, transpose=True)
    _conv(g, sd, "depth_head.resize_layers.3", oc[3], oc[3], 3)
    for i, c in enumerate(oc):
        _conv(g, sd, f"depth_head.scratch.layer{i + 1}_rn", f, c, 3, bias=False)
    for r in range(1, 5):
        n = f"depth_head.scratch.refinenet{r}"
        _conv(g, sd, f"{n}.out_conv", f, f, 1)
        for u in (1, 2):
            for c in (1, 2):
                _conv(g, sd, f"{n}.resConfUnit{u}.conv{c}", f, f, 3)
    _conv(g, sd, "depth_head.scratch.output_conv1", f // 2, f, 3)
    _conv(g, sd, "depth_head.scratch.output_conv2.0", DEPTH_HEAD_HIDDEN, f // 2, 3)
    _conv(g, sd, "depth_head.scratch.output_conv2.2", 1, DEPTH_HEAD_HIDDEN, 1)
    # The head ends in ReLU: a positive bias keeps the random map from clipping to a constant.
    sd["depth_head.scratch.output_conv2.2.bias"] = torch.tensor([1.0])
    return sd


def tiny_teed_state(seed: int) -> dict[str, torch.Tensor]:
    """The real TEED (MTEED) architecture with random weights: xavier-normal kernels as TEED
    initialises them, small random biases."""
    from qwen2vl_flux.encoder_server.control_maps import TEED

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, value in TEED().state_dict().items():
        if name.endswith(".weight"):
            fan_in = value.shape[1] * value[0, 0].numel()
            fan_out = value.shape[0] * value[0, 0].numel()
            sd[name] = _normal(g, *value.shape, std=math.sqrt(2.0 / (fan_in + fan_out)))
        else:
            sd[name] = _normal(g, *value.shape, std=0.05)
    return sd


def write_tiny_control_weights(layout: CheckpointLayout, seed: int) -> None:
    """Write DIR/depth-anything-v2/depth_anything_v2_vitl.pth and DIR/anyline/MTEED.pth."""
    layout.depth_anything.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_depth_anything_state(seed), layout.depth_anything / "depth_anything_v2_vitl.pth")
    layout.anyline.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_teed_state(seed + 1), layout.anyline)
