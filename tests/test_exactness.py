"""The last bit against the original Qwen2VL-Flux scripts, pinned operation by operation.

Run beside the original (diffusers 0.30, its own pipelines, fp32 CPU, one thread), our
img2img, inpaint and controlnet-inpaint differed by one level on some pixels until the init
image was VAE-encoded in the layout the original encodes it in. These tests hold that
operation, and would fail if a copy crept back in.
"""
from __future__ import annotations

import pytest
import torch

from qwen2vl_flux.generator_server.pipeline import FluxGenerator
from pictures import picture


@pytest.fixture(scope="module")
def generator(tiny_checkpoints):
    return FluxGenerator(tiny_checkpoints)


def _sample(generator: FluxGenerator, pixels: torch.Tensor, seed: int) -> torch.Tensor:
    vae = generator.vae
    with torch.inference_mode():
        latents = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(seed))
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def test_init_image_is_encoded_in_the_preprocessors_channels_last_view(generator):
    """The original (and stock FluxImg2ImgPipeline) hand VaeImageProcessor's output, a
    channels-last view, straight to the VAE; a contiguous copy rounds the convolutions
    differently (seen: 2.6e-6 on the latents, one level on some output pixels)."""
    image = picture(96, 64, seed=3)
    view = generator.image_processor.preprocess(image, height=64, width=96)
    assert not view.is_contiguous()   # what the original encodes
    with torch.inference_mode():
        ours = generator._encode_image(image, 64, 96, torch.Generator().manual_seed(1))
    assert torch.equal(ours, _sample(generator, view, 1))
    # The layout is observable on this checkpoint, so the assertion above can fail.
    assert not torch.equal(_sample(generator, view.contiguous(), 1), _sample(generator, view, 1))


def test_control_maps_are_encoded_as_a_contiguous_batch(generator):
    """The original's prepare_image repeats control maps to the batch (repeat_interleave),
    which copies them contiguous: that is the layout the ControlNet modes must keep."""
    image = picture(96, 64, seed=4)
    view = generator.image_processor.preprocess(image, height=64, width=96)
    with torch.inference_mode():
        ours = generator._encode_image(image, 64, 96, torch.Generator().manual_seed(2), count=2)
    assert torch.equal(ours, _sample(generator, view.repeat_interleave(2, dim=0), 2))
