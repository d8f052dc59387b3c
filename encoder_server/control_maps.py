"""Control maps for the ControlNet modes: depth (Depth Anything V2), line (Anyline or Canny), denoise.

No gRPC here: the encoder servicer wraps `ControlMapper`. The maps reproduce what the original
Qwen2VL-Flux computes from the (already resized) input image:

* depth: the original's `generate_depth_map`, i.e. Depth Anything V2's `infer_image` (input size 518,
  keep-aspect "lower_bound" resize to multiples of 14 with cv2 INTER_CUBIC on the float64 image,
  ImageNet normalisation, forward, bilinear (align_corners=True) back to the input size), then
  min-max normalised, truncated to uint8 and repeated to RGB. The network runs through transformers'
  `DepthAnythingForDepthEstimation`, with the original DINOv2 position-embedding interpolation
  patched in (transformers interpolates to an exact size; the original uses a scale factor with a
  0.1 offset, which samples slightly different points for every input that is not 518x518).
* line: controlnet_aux 0.0.9/0.0.10 `AnylineDetector.__call__` with detect_resolution=1280 (the MTEED
  network, TEED architecture, reimplemented below with the same state-dict keys), or cv2.Canny(50, 150).
* denoise: a Gaussian blur of a map.

Both networks run in float32 by default, as in the original (it never casts them to bfloat16).
"""
from __future__ import annotations

import functools
import math
import re
import threading
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from qwen2vl_flux.checkpoints import CheckpointError, CheckpointLayout
from qwen2vl_flux.client.errors import InvalidArgument

DEPTH_PTH_NAME = "depth_anything_v2_vitl.pth"
LINE_DETECTORS = ("auto", "anyline", "canny")

# Depth Anything V2 `infer_image` / `image2tensor` constants.
DEPTH_INPUT_SIZE = 518
DEPTH_MULTIPLE_OF = 14
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# AnylineDetector.__call__ defaults as the original calls it.
ANYLINE_DETECT_RESOLUTION = 1280
ANYLINE_GAUSSIAN_SIGMA = 2.0
ANYLINE_INTENSITY_THRESHOLD = 3
ANYLINE_MIN_OBJECT_SIZE = 36

CANNY_LOW, CANNY_HIGH = 50, 150

# DepthAnythingV2.intermediate_layer_idx, keyed by the number of DINOv2 blocks
# (vits and vitb both have 12 blocks and the same indices).
_INTERMEDIATE_LAYERS = {12: [2, 5, 8, 11], 24: [4, 11, 17, 23], 40: [9, 19, 29, 39]}


# --------------------------------------------------------------------------- public helpers

def denoise_map(image: Image.Image, radius: float) -> Image.Image:
    """Gaussian blur of a control map; radius in pixels, 0 returns the image unchanged."""
    try:
        radius = float(radius)
    except (TypeError, ValueError):
        raise InvalidArgument("denoise_radius", f"denoise radius must be a number, got {radius!r}") from None
    if not math.isfinite(radius) or radius < 0:
        raise InvalidArgument("denoise_radius", f"denoise radius must be a finite number >= 0, got {radius}")
    if radius == 0:
        return image
    return image.filter(ImageFilter.GaussianBlur(radius))


def intermediate_layers(depth: int) -> list[int]:
    """The four DINOv2 blocks (0-based) whose outputs feed the DPT head."""
    if depth in _INTERMEDIATE_LAYERS:
        return list(_INTERMEDIATE_LAYERS[depth])
    if depth < 4:
        raise CheckpointError(f"Depth Anything needs at least 4 DINOv2 blocks, the checkpoint has {depth}")
    # Not a published size (the tiny preset): evenly spaced, ending at the last block.
    return [round((k + 1) * depth / 4) - 1 for k in range(4)]


# --------------------------------------------------------------------------- depth: conversion

def _block_count(sd: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in sd for m in [pattern.match(k)] if m}
    if not indices or sorted(indices) != list(range(len(indices))):
        raise CheckpointError(f"Depth Anything checkpoint: no contiguous `{prefix}N` blocks")
    return len(indices)


def _depth_config(sd: dict):
    """A DepthAnythingConfig read off the original state dict's tensor shapes."""
    from transformers import DepthAnythingConfig, Dinov2Config

    required = ("pretrained.cls_token", "pretrained.pos_embed", "pretrained.patch_embed.proj.weight",
                "depth_head.scratch.layer1_rn.weight", "depth_head.scratch.output_conv2.0.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise CheckpointError(
            f"not a Depth Anything V2 checkpoint in the original format (lacks {', '.join(missing)})")
    if any(k.startswith("depth_head.readout_projects.") for k in sd):
        raise CheckpointError("Depth Anything checkpoints with use_clstoken=True are not supported")
    if any(".bn1." in k or ".bn2." in k for k in sd if k.startswith("depth_head.")):
        raise CheckpointError("Depth Anything checkpoints with use_bn=True are not supported")
    if "pretrained.blocks.0.mlp.fc1.weight" not in sd:
        raise CheckpointError("Depth Anything checkpoints with a SwiGLU FFN (vitg) are not supported")
    if any(k.startswith("pretrained.register_tokens") for k in sd):
        raise CheckpointError("DINOv2 with register tokens is not supported")

    embed = sd["pretrained.cls_token"].shape[-1]
    depth = _block_count(sd, "pretrained.blocks.")
    patch = sd["pretrained.patch_embed.proj.weight"].shape[-1]
    positions = sd["pretrained.pos_embed"].shape[1] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise CheckpointError(f"Depth Anything pos_embed has {positions} patch positions, not a square")
    mlp_hidden = sd["pretrained.blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = mlp_hidden // embed if mlp_hidden % embed == 0 else mlp_hidden / embed
    heads = embed // 64
    if heads < 1 or embed % 64:
        raise CheckpointError(f"Depth Anything embed dim {embed} is not a multiple of 64 (head dim 64)")
    out_channels = [sd[f"depth_head.projects.{i}.weight"].shape[0] for i in range(4)]
    features = sd["depth_head.scratch.layer1_rn.weight"].shape[0]
    head_hidden = sd["depth_head.scratch.output_conv2.0.weight"].shape[0]

    backbone = Dinov2Config(
        image_size=grid * patch, patch_size=patch, num_channels=3, hidden_size=embed,
        num_hidden_layers=depth, num_attention_heads=heads, mlp_ratio=mlp_ratio,
        hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, layerscale_value=1.0,
        use_swiglu_ffn=False, apply_layernorm=True, reshape_hidden_states=False,
        # HF stage 0 is the embeddings, so block i is stage i + 1.
        out_indices=[i + 1 for i in intermediate_layers(depth)],
    )
    return DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=embed, patch_size=patch,
        reassemble_factors=[4, 2, 1, 0.5], neck_hidden_sizes=out_channels,
        fusion_hidden_size=features, head_hidden_size=head_hidden,
        depth_estimation_type="relative", max_depth=1,
    )


def _rename_depth_keys(sd: dict, depth: int, target_keys: set[str]) -> dict:
    """Original Depth Anything V2 names -> transformers names (after convert_depth_anything_to_hf.py)."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str) -> None:
        if src not in sd:
            raise CheckpointError(f"Depth Anything checkpoint lacks {src}")
        out[dst] = sd.pop(src)

    move("pretrained.cls_token", "backbone.embeddings.cls_token")
    move("pretrained.mask_token", "backbone.embeddings.mask_token")
    move("pretrained.pos_embed", "backbone.embeddings.position_embeddings")
    move("pretrained.patch_embed.proj.weight", "backbone.embeddings.patch_embeddings.projection.weight")
    move("pretrained.patch_embed.proj.bias", "backbone.embeddings.patch_embeddings.projection.bias")

    # transformers 5 names the attention q_proj/k_proj/v_proj/o_proj; older versions
    # attention.attention.{query,key,value} and attention.output.dense.
    new_names = "backbone.encoder.layer.0.attention.q_proj.weight" in target_keys
    qkv_names = ("attention.q_proj", "attention.k_proj", "attention.v_proj") if new_names else (
        "attention.attention.query", "attention.attention.key", "attention.attention.value")
    proj_name = "attention.o_proj" if new_names else "attention.output.dense"
    for i in range(depth):
        src, dst = f"pretrained.blocks.{i}.", f"backbone.encoder.layer.{i}."
        for a, b in (("ls1.gamma", "layer_scale1.lambda1"), ("ls2.gamma", "layer_scale2.lambda1")):
            if src + a in sd:
                move(src + a, dst + b)
            else:  # no layer scale in the original = scale 1
                out[dst + b] = torch.ones(out["backbone.embeddings.cls_token"].shape[-1])
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                     "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"):
            move(src + name, dst + name)
        move(src + "attn.proj.weight", dst + proj_name + ".weight")
        move(src + "attn.proj.bias", dst + proj_name + ".bias")
        qkv_w, qkv_b = sd.pop(src + "attn.qkv.weight"), sd.pop(src + "attn.qkv.bias")
        hidden = qkv_w.shape[1]
        for j, name in enumerate(qkv_names):
            out[dst + name + ".weight"] = qkv_w[j * hidden:(j + 1) * hidden].clone()
            out[dst + name + ".bias"] = qkv_b[j * hidden:(j + 1) * hidden].clone()
    move("pretrained.norm.weight", "backbone.layernorm.weight")
    move("pretrained.norm.bias", "backbone.layernorm.bias")

    for i in range(4):
        for p in ("weight", "bias"):
            move(f"depth_head.projects.{i}.{p}", f"neck.reassemble_stage.layers.{i}.projection.{p}")
            if i != 2:
                move(f"depth_head.resize_layers.{i}.{p}", f"neck.reassemble_stage.layers.{i}.resize.{p}")
        move(f"depth_head.scratch.layer{i + 1}_rn.weight", f"neck.convs.{i}.weight")
    # refinenet4 fuses first: it is fusion layer 0.
    for i, j in ((1, 3), (2, 2), (3, 1), (4, 0)):
        src, dst = f"depth_head.scratch.refinenet{i}.", f"neck.fusion_stage.layers.{j}."
        for p in ("weight", "bias"):
            move(f"{src}out_conv.{p}", f"{dst}projection.{p}")
            for u in (1, 2):
                for c in (1, 2):
                    move(f"{src}resConfUnit{u}.conv{c}.{p}", f"{dst}residual_layer{u}.convolution{c}.{p}")
    for p in ("weight", "bias"):
        move(f"depth_head.scratch.output_conv1.{p}", f"head.conv1.{p}")
        move(f"depth_head.scratch.output_conv2.0.{p}", f"head.conv2.{p}")
        move(f"depth_head.scratch.output_conv2.2.{p}", f"head.conv3.{p}")
    if sd:
        raise CheckpointError(f"Depth Anything checkpoint has unexpected keys: {', '.join(sorted(sd)[:8])}")
    return out


def _load_pth(path: Path) -> dict:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _depth_model_from_original(sd: dict):
    """Build DepthAnythingForDepthEstimation from an original-format state dict (float32, CPU)."""
    from transformers import DepthAnythingForDepthEstimation

    config = _depth_config(sd)
    with torch.device("meta"):
        model = DepthAnythingForDepthEstimation(config)
    hf_sd = _rename_depth_keys(sd, config.backbone_config.num_hidden_layers, set(model.state_dict()))
    hf_sd = {k: v.to(torch.float32).contiguous() for k, v in hf_sd.items()}
    model.load_state_dict(hf_sd, strict=True, assign=True)
    return model.eval()


def convert_depth_anything(pth: Path, out_dir: Path) -> Path:
    """Convert an original Depth Anything V2 .pth into the transformers format (config.json +
    model.safetensors) in out_dir; `ControlMapper` prefers that over converting at every start."""
    pth, out_dir = Path(pth), Path(out_dir)
    if not pth.exists():
        raise CheckpointError(f"{pth} does not exist")
    model = _depth_model_from_original(_load_pth(pth))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    return out_dir


def _original_pos_encoding(embeddings_module, embeddings: torch.Tensor, height: int, width: int):
    """DINOv2's interpolate_pos_encoding as Depth Anything V2 ships it (interpolate_offset 0.1,
    scale_factor, bicubic, no antialias, float32)."""
    pos_embed = embeddings_module.position_embeddings
    npatch = embeddings.shape[1] - 1
    n = pos_embed.shape[1] - 1
    if npatch == n and height == width:
        return pos_embed
    pos = pos_embed.float()
    class_pos, patch_pos = pos[:, 0], pos[:, 1:]
    dim = embeddings.shape[-1]
    patch_h, patch_w = embeddings_module.patch_embeddings.patch_size
    h0 = height // patch_h + 0.1
    w0 = width // patch_w + 0.1
    sqrt_n = math.sqrt(n)
    patch_pos = F.interpolate(
        patch_pos.reshape(1, int(sqrt_n), int(sqrt_n), dim).permute(0, 3, 1, 2),
        scale_factor=(float(h0) / sqrt_n, float(w0) / sqrt_n), mode="bicubic", antialias=False)
    assert int(h0) == patch_pos.shape[-2] and int(w0) == patch_pos.shape[-1]
    patch_pos = patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos.unsqueeze(0), patch_pos), dim=1).to(embeddings.dtype)


def _prepare_depth_model(model):
    """The original's numerics: its position-embedding interpolation, and plain (eager) attention,
    which is what its MemEffAttention falls back to without xFormers (bit-equal on CPU in fp32)."""
    emb = model.backbone.embeddings
    emb.interpolate_pos_encoding = functools.partial(_original_pos_encoding, emb)
    model.set_attn_implementation("eager")
    return model


def load_depth_model(layout: CheckpointLayout, device="cpu", dtype=torch.float32):
    """HF format from DIR/depth-anything-v2/config.json if present, else the original .pth
    converted in memory. Raises CheckpointError when neither exists."""
    from transformers import DepthAnythingForDepthEstimation

    folder = layout.depth_anything
    if (folder / "config.json").exists():
        model = DepthAnythingForDepthEstimation.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager")
    elif (folder / DEPTH_PTH_NAME).exists():
        model = _depth_model_from_original(_load_pth(folder / DEPTH_PTH_NAME))
    else:
        raise CheckpointError(
            f"depth maps need Depth Anything V2 weights: {folder / DEPTH_PTH_NAME} (original format, "
            f"as published) or {folder / 'config.json'} + model.safetensors "
            "(`qwen2vl-flux convert-depth-anything`); neither exists")
    return _prepare_depth_model(model.to(device=device, dtype=dtype).eval().requires_grad_(False))


# --------------------------------------------------------------------------- depth: inference

def _constrain_to_multiple_of(x, multiple: int, min_val=0, max_val=None) -> int:
    y = (np.round(x / multiple) * multiple).astype(int)
    if max_val is not None and y > max_val:
        y = (np.floor(x / multiple) * multiple).astype(int)
    if y < min_val:
        y = (np.ceil(x / multiple) * multiple).astype(int)
    return int(y)


def depth_input_size(width: int, height: int, input_size: int = DEPTH_INPUT_SIZE,
                     multiple: int = DEPTH_MULTIPLE_OF) -> tuple[int, int]:
    """Depth Anything's Resize(keep_aspect_ratio, lower_bound, ensure_multiple_of=14).get_size."""
    scale_height = input_size / height
    scale_width = input_size / width
    if scale_width > scale_height:
        scale_height = scale_width
    else:
        scale_width = scale_height
    new_height = _constrain_to_multiple_of(scale_height * height, multiple, min_val=input_size)
    new_width = _constrain_to_multiple_of(scale_width * width, multiple, min_val=input_size)
    return new_width, new_height


def depth_pixel_values(rgb: np.ndarray, input_size: int = DEPTH_INPUT_SIZE) -> torch.Tensor:
    """`image2tensor`: the original converts RGB->BGR->RGB (identity), divides by 255 (float64),
    resizes with cv2 INTER_CUBIC, normalises in float64, then casts to float32 CHW."""
    image = rgb / 255.0
    width, height = depth_input_size(rgb.shape[1], rgb.shape[0], input_size)
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)
    image = (image - IMAGENET_MEAN) / IMAGENET_STD
    image = np.ascontiguousarray(np.transpose(image, (2, 0, 1))).astype(np.float32)
    return torch.from_numpy(image).unsqueeze(0)


def depth_to_image(depth: np.ndarray) -> Image.Image:
    """The original's min-max normalisation, uint8 truncation and GRAY2RGB (float32 numpy, as there)."""
    lo, hi = depth.min(), depth.max()
    if not hi > lo:  # the original divides by zero here (NaN -> 0 after the cast)
        grey = np.zeros(depth.shape, dtype=np.uint8)
    else:
        grey = ((depth - lo) / (hi - lo) * 255).astype(np.uint8)
    return Image.fromarray(cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB))


# --------------------------------------------------------------------------- line: TEED / MTEED

def smish(x: torch.Tensor) -> torch.Tensor:
    """x * tanh(log(1 + sigmoid(x))), TEED's activation."""
    return x * torch.tanh(torch.log(1 + torch.sigmoid(x)))


class Smish(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return smish(x)


class _DoubleConv(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int | None = None, stride: int = 1, act_out: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(mid, cout or mid, 3, padding=1)
        self.act_out = act_out

    def forward(self, x):
        x = self.conv2(smish(self.conv1(x)))
        return smish(x) if self.act_out else x


class _PointConv(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x):
        return self.conv(x)


class _DenseLayer(nn.Module):
    """conv3x3(pad 2) -> smish -> conv3x3(pad 0) on smish(x1), averaged with x2."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=2)
        self.conv2 = nn.Conv2d(cout, cout, 3)

    def forward(self, x1, x2):
        return 0.5 * (self.conv2(smish(self.conv1(smish(x1)))) + x2)


class _DenseBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.denselayer1 = _DenseLayer(cin, cout)

    def forward(self, x1, x2):
        return self.denselayer1(x1, x2)


class _UpBlock(nn.Module):
    """(1x1 conv, smish, stride-2 transposed conv) x up_scale; 16 channels inside, 1 out."""

    def __init__(self, cin: int, up_scale: int):
        super().__init__()
        kernel, pad = 2 ** up_scale, [0, 0, 1, 3, 7][up_scale]
        layers: list[nn.Module] = []
        for i in range(up_scale):
            cout = 1 if i == up_scale - 1 else 16
            layers += [nn.Conv2d(cin, cout, 1), Smish(), nn.ConvTranspose2d(cout, cout, kernel, stride=2, padding=pad)]
            cin = cout
        self.features = nn.Sequential(*layers)

    def forward(self, x):
        return self.features(x)


class _DoubleFusion(nn.Module):
    def __init__(self, cin: int = 3):
        super().__init__()
        self.DWconv1 = nn.Conv2d(cin, cin * 8, 3, padding=1, groups=cin)
        self.DWconv2 = nn.Conv2d(cin * 8, cin * 8, 3, padding=1, groups=cin * 8)

    def forward(self, x):
        attn = self.DWconv1(smish(x))
        attn2 = self.DWconv2(smish(attn))
        return smish((attn2 + attn).sum(1)).unsqueeze(1)


class TEED(nn.Module):
    """TEED (Tiny and Efficient Edge Detector), the network behind MTEED.pth; parameter names
    follow controlnet_aux's `TED` so its state dicts load with strict=True. Input: 1x3xHxW in
    0..255 with H, W multiples of 8. Output: four 1x1xHxW logit maps (three scales + fused)."""

    def __init__(self):
        super().__init__()
        self.block_1 = _DoubleConv(3, 16, 16, stride=2)
        self.block_2 = _DoubleConv(16, 32, act_out=False)
        self.dblock_3 = _DenseBlock(32, 48)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.side_1 = _PointConv(16, 32, stride=2)
        self.pre_dense_3 = _PointConv(32, 48, stride=1)
        self.up_block_1 = _UpBlock(16, 1)
        self.up_block_2 = _UpBlock(32, 1)
        self.up_block_3 = _UpBlock(48, 2)
        self.block_cat = _DoubleFusion(3)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        block_1 = self.block_1(x)
        block_1_side = self.side_1(block_1)
        block_2 = self.block_2(block_1)
        block_2_down = self.maxpool(block_2)
        block_2_add = block_2_down + block_1_side
        block_3 = self.dblock_3(block_2_add, self.pre_dense_3(block_2_down))
        results = [self.up_block_1(block_1), self.up_block_2(block_2), self.up_block_3(block_3)]
        results.append(self.block_cat(torch.cat(results, dim=1)))
        return results


def load_teed(path: Path, device="cpu") -> TEED:
    model = TEED()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    try:
        model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} is not an MTEED/TEED state dict: {exc}") from None
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


# --------------------------------------------------------------------------- line: Anyline post-processing

def hwc3(x: np.ndarray) -> np.ndarray:
    """controlnet_aux.util.HWC3."""
    assert x.dtype == np.uint8
    if x.ndim == 2:
        x = x[:, :, None]
    c = x.shape[2]
    if c == 3:
        return x
    if c == 1:
        return np.concatenate([x, x, x], axis=2)
    color = x[:, :, 0:3].astype(np.float32)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """controlnet_aux.util.resize_image: short side to `resolution`, each side rounded to 64."""
    h, w = float(image.shape[0]), float(image.shape[1])
    k = float(resolution) / min(h, w)
    h *= k
    w *= k
    h = int(np.round(h / 64.0)) * 64
    w = int(np.round(w / 64.0)) * 64
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    y = x.astype(np.float32) * float(step + 1)
    return y.astype(np.int32).astype(np.float32) / float(step)


def remove_small_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """skimage.morphology.remove_small_objects(mask, min_size, connectivity=1) for an HxWxC mask
    whose C channels are equal (Anyline passes the HWC3 lineart layer). skimage labels it in 3-D
    with face connectivity, so each 4-connected 2-D component counts C times its area: with C=3
    and min_size=36, components of fewer than 12 pixels go."""
    channels = mask.shape[2] if mask.ndim == 3 else 1
    plane = (mask[:, :, 0] if mask.ndim == 3 else mask).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(plane, connectivity=4)
    keep = stats[:, cv2.CC_STAT_AREA].astype(np.int64) * channels >= min_size
    keep[0] = False  # background
    kept = keep[labels]
    return np.repeat(kept[:, :, None], channels, axis=2) if mask.ndim == 3 else kept


def lineart_standard_intensity(image: np.ndarray, sigma: float, threshold: float) -> np.ndarray:
    x = image.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), sigma)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    selected = intensity[intensity > threshold]
    # np.median of an empty selection is NaN and max(16, NaN) is 16: skip the warning, keep the value.
    median = np.median(selected) if selected.size else float("nan")
    intensity /= max(16, median)
    intensity *= 127
    return intensity.clip(0, 255).astype(np.uint8)


def get_intensity_mask(image: np.ndarray, lower_bound: int, upper_bound: int) -> np.ndarray:
    mask = image[:, :, 0]
    mask = np.where((mask >= lower_bound) & (mask <= upper_bound), mask, 0)
    return np.expand_dims(mask, 2).repeat(3, axis=2)


def combine_layers(base: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Anyline's screen blend, in uint8 arithmetic (it wraps around, as in the original)."""
    mask = top.astype(bool)
    temp = 1 - (1 - top) * (1 - base)
    return base * (~mask) + temp * mask


def teed_edge_map(model: TEED, image: np.ndarray, device) -> np.ndarray:
    """TEED forward on the 0..255 image and the per-output sigmoid-mean fusion, safe_step(2)."""
    height, width = image.shape[:2]
    with torch.no_grad():
        x = torch.from_numpy(image.copy()).float().to(device)
        x = x.permute(2, 0, 1).unsqueeze(0)  # einops "h w c -> 1 c h w": a view, as there
        edges = model(x)
        edges = [e.detach().cpu().numpy().astype(np.float32)[0, 0] for e in edges]
    edges = [cv2.resize(e, (width, height), interpolation=cv2.INTER_LINEAR) for e in edges]
    edges = np.stack(edges, axis=2)
    edge = 1 / (1 + np.exp(-np.mean(edges, axis=2).astype(np.float64)))
    edge = safe_step(edge, 2)
    return (edge * 255.0).clip(0, 255).astype(np.uint8)


def anyline(model: TEED, rgb: np.ndarray, device="cpu", detect_resolution: int = ANYLINE_DETECT_RESOLUTION,
            sigma: float = ANYLINE_GAUSSIAN_SIGMA, threshold: float = ANYLINE_INTENSITY_THRESHOLD) -> np.ndarray:
    """controlnet_aux AnylineDetector.__call__ (0.0.9 / 0.0.10) on an HxWx3 uint8 RGB array."""
    original_height, original_width = rgb.shape[:2]
    image = resize_image(hwc3(rgb), detect_resolution)
    mteed = hwc3(teed_edge_map(model, image, device))
    lineart = hwc3(lineart_standard_intensity(image, sigma, threshold))
    lineart = get_intensity_mask(lineart, lower_bound=0, upper_bound=255)
    lineart = lineart * remove_small_objects(lineart.astype(bool), ANYLINE_MIN_OBJECT_SIZE)
    final = combine_layers(mteed, lineart)
    return cv2.resize(final, (original_width, original_height), interpolation=cv2.INTER_LINEAR)


def canny(rgb: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.cvtColor(cv2.Canny(gray, CANNY_LOW, CANNY_HIGH), cv2.COLOR_GRAY2RGB)


# --------------------------------------------------------------------------- the mapper

def _rgb_array(image: Image.Image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        raise InvalidArgument("image", f"expected a PIL image, got {type(image).__name__}")
    return np.array(image.convert("RGB"), dtype=np.uint8)


class ControlMapper:
    """Depth and line control maps from the checkpoint layout; networks load on first use and stay."""

    def __init__(self, layout: CheckpointLayout, device="cpu", dtype: torch.dtype = torch.float32,
                 anyline_resolution: int = ANYLINE_DETECT_RESOLUTION):
        self.layout = layout
        self.device = torch.device(device)
        # dtype of the depth network (the original runs it in float32); TEED always runs in float32.
        self.dtype = dtype
        # Anyline's detect_resolution: 1280 as the original calls it; smaller only to save time in tests.
        self.anyline_resolution = anyline_resolution
        self._lock = threading.Lock()
        self._depth_model = None
        self._teed: TEED | None = None

    # -- what is available
    def depth_available(self) -> bool:
        folder = self.layout.depth_anything
        return (folder / "config.json").exists() or (folder / DEPTH_PTH_NAME).exists()

    def line_detectors(self) -> list[str]:
        return ["anyline", "canny"] if self.layout.anyline.exists() else ["canny"]

    # -- models
    def _depth(self):
        with self._lock:
            if self._depth_model is None:
                self._depth_model = load_depth_model(self.layout, self.device, self.dtype)
            return self._depth_model

    def _line_model(self) -> TEED:
        with self._lock:
            if self._teed is None:
                self._teed = load_teed(self.layout.anyline, self.device)
            return self._teed

    # -- maps
    def depth_array(self, image: Image.Image) -> np.ndarray:
        """The raw relative depth (float32, HxW), before normalisation."""
        rgb = _rgb_array(image)
        model = self._depth()
        pixel_values = depth_pixel_values(rgb).to(self.device, self.dtype)
        with torch.no_grad():
            depth = model(pixel_values=pixel_values).predicted_depth.float()
            depth = F.interpolate(depth[:, None], rgb.shape[:2], mode="bilinear", align_corners=True)[0, 0]
        return depth.cpu().numpy()

    def depth(self, image: Image.Image) -> Image.Image:
        if not self.depth_available():
            raise InvalidArgument(
                "depth", f"this encoder has no depth model ({self.layout.depth_anything} is absent; the demo model "
                "ships none): send a depth map of your own (CLI --control-map depth=IMG, library "
                "control_maps={'depth': image}) or leave depth out (--no-depth, depth=False)")
        return depth_to_image(self.depth_array(image))

    def resolve_detector(self, detector: str | None = "auto") -> str:
        name = (detector or "auto").strip().lower()
        if name not in LINE_DETECTORS:
            raise InvalidArgument(
                "line_detector", f"unknown line detector {detector!r}; choose one of {', '.join(LINE_DETECTORS)}")
        if name == "auto":
            return "anyline" if self.layout.anyline.exists() else "canny"
        if name == "anyline" and not self.layout.anyline.exists():
            raise InvalidArgument(
                "line_detector", f"the anyline detector needs {self.layout.anyline}, which does not exist "
                "(download MTEED.pth from TheMistoAI/MistoLine, Anyline/) ; use canny or auto")
        return name

    def line(self, image: Image.Image, detector: str = "auto") -> tuple[Image.Image, str]:
        name = self.resolve_detector(detector)
        rgb = _rgb_array(image)
        if name == "anyline":
            out = anyline(self._line_model(), rgb, self.device, self.anyline_resolution)
        else:
            out = canny(rgb)
        return Image.fromarray(out), name
