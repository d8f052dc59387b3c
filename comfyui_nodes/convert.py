"""ComfyUI tensors <-> PIL images.

IMAGE is a float32 tensor (B, H, W, C) in [0, 1]; MASK is (B, H, W) or (H, W), 1.0 = repaint.
Torch and numpy come with ComfyUI; the pack itself declares only the light client.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _to_uint8(array: np.ndarray) -> np.ndarray:
    # Round (not truncate): LoadImage divides by 255, so x * 255 must come back as x.
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


def image_to_pils(image: torch.Tensor) -> list[Image.Image]:
    """Every picture of an IMAGE batch as RGB (RGBA when it has 4 channels)."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise ValueError(f"IMAGE must be (B, H, W, C), got shape {tuple(image.shape)}")
    pixels = _to_uint8(image.detach().to("cpu", torch.float32).numpy())
    channels = pixels.shape[-1]
    if channels == 1:
        return [Image.fromarray(p[..., 0], "L").convert("RGB") for p in pixels]
    if channels == 3:
        return [Image.fromarray(p, "RGB") for p in pixels]
    if channels == 4:
        return [Image.fromarray(p, "RGBA") for p in pixels]
    raise ValueError(f"IMAGE must have 1, 3 or 4 channels, got {channels}")


def image_to_pil(image: torch.Tensor, what: str = "image") -> Image.Image:
    """The first picture of an IMAGE batch (the services take one image a / reference b)."""
    pictures = image_to_pils(image)
    if not pictures:
        raise ValueError(f"{what}: the IMAGE batch is empty")
    return pictures[0]


def pils_to_image(pictures: list[Image.Image]) -> torch.Tensor:
    """PIL pictures of one size -> IMAGE (N, H, W, 3) float32 in [0, 1]."""
    if not pictures:
        raise ValueError("no pictures to turn into an IMAGE")
    arrays = [np.asarray(p.convert("RGB"), dtype=np.float32) / 255.0 for p in pictures]
    sizes = {a.shape for a in arrays}
    if len(sizes) != 1:
        raise ValueError(f"pictures of different sizes cannot form one IMAGE batch: {sorted(sizes)}")
    return torch.from_numpy(np.stack(arrays)).contiguous()


def mask_to_pil(mask: torch.Tensor) -> Image.Image:
    """The first mask of a MASK as a greyscale picture (white = repaint), at its own size:
    the generator resizes it to image a by the one mask rule (client.images.fit_mask)."""
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3 or mask.shape[0] == 0:
        raise ValueError(f"MASK must be (B, H, W) or (H, W), got shape {tuple(mask.shape)}")
    return Image.fromarray(_to_uint8(mask[0].detach().to("cpu", torch.float32).numpy()), "L")
