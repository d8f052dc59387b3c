"""Variation end to end through two real server processes over gRPC on loopback."""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from qwen2vl_flux.client.api import png_metadata
from qwen2vl_flux.client.modes import ASPECT_RATIOS
from qwen2vl_flux.client.wire import pad_tokens
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc
from reference import reference_variation

FAST = dict(steps=2, width=64, height=48)


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    """A 100x80 test picture with structure (Qwen sees it; focus has something to weigh)."""
    x, y = np.meshgrid(np.arange(100), np.arange(80))
    rgb = np.stack([x * 2.5, y * 3.0, 255 - x * 2.0], axis=-1).clip(0, 255).astype(np.uint8)
    rgb[20:50, 30:60] = (220, 40, 40)
    return Image.fromarray(rgb)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_returns_image_count_images_of_the_aspect_ratio_size(client, picture):
    result = client.variation(picture, steps=1, image_count=2, aspect_ratio="16:9", seed=3)
    assert len(result.images) == 2
    assert result.images.sizes == [ASPECT_RATIOS["16:9"]] * 2          # known before any decode
    assert result.images == list(result.images) and result.images[0] is result.images[0]   # decoded once
    assert all(image.size == ASPECT_RATIOS["16:9"] for image in result.images)
    assert np.asarray(result.images[-1]).tobytes() == \
        np.asarray(Image.open(io.BytesIO(result.data[1])).convert("RGB")).tobytes()
    assert result.parameters["aspect_ratio"] == "16:9" and result.seed == 3
    meta = png_metadata(result.images[0])
    assert meta["parameters"]["seed"] == 3 and meta["versions"]["diffusers"]
    assert [png_metadata(image)["index"] for image in result.images] == [0, 1]   # encoded apart, sent in order


def test_same_seed_gives_identical_pngs_and_another_seed_does_not(client, picture):
    bundle = client.encode(picture)
    first = client.generate(bundle, seed=11, **FAST)
    again = client.generate(bundle, seed=11, **FAST)
    other = client.generate(bundle, seed=12, **FAST)
    assert first.data == again.data
    assert first.data != other.data
    assert np.abs(_pixels(first.images[0]) - _pixels(other.images[0])).max() > 10


def test_client_picks_and_reports_a_seed_when_none_is_given(client, picture):
    result = client.variation(picture, **FAST)
    assert isinstance(result.seed, int) and result.parameters["seed"] == result.seed
    replay = client.variation(picture, seed=result.seed, **FAST)
    assert replay.data == result.data


@pytest.mark.parametrize("prompt", ["", "a red circle on a blue background"])
@pytest.mark.parametrize("focus", [None, (0.3, 0.6, 0.4)])
def test_matches_the_in_process_reference(client, picture, tiny_checkpoints, prompt, focus):
    served = client.variation(picture, prompt=prompt, focus=focus, seed=7, **FAST).images[0]
    expected = reference_variation(str(tiny_checkpoints), picture, prompt=prompt, focus=focus, seed=7,
                                   steps=FAST["steps"], width=FAST["width"], height=FAST["height"])[0]
    assert served.size == expected.size == (64, 48)
    assert np.abs(_pixels(served) - _pixels(expected)).max() <= 1


def test_batch_matches_the_reference_batch(client, picture, tiny_checkpoints):
    served = client.variation(picture, seed=5, image_count=2, **FAST).images
    expected = reference_variation(str(tiny_checkpoints), picture, seed=5, image_count=2,
                                   steps=FAST["steps"], width=FAST["width"], height=FAST["height"])
    for s, e in zip(served, expected, strict=True):
        assert np.abs(_pixels(s) - _pixels(e)).max() <= 1


def test_focus_and_prompt_change_the_image(client, picture):
    plain = client.variation(picture, seed=4, **FAST)
    focused = client.variation(picture, focus=(0.2, 0.2, 0.3), seed=4, **FAST)
    prompted = client.variation(picture, prompt="a green square", seed=4, **FAST)
    assert focused.data != plain.data and prompted.data != plain.data


def test_padding_on_the_wire_does_not_change_the_image(client, picture):
    bundle = client.encode(picture, prompt="stripes")
    tokens = bundle.images[0].tokens
    assert tokens.tensor.shape[1] % 64 == 0 and tokens.valid_length < tokens.tensor.shape[1]
    images = []
    for size in (tokens.valid_length, tokens.tensor.shape[1], tokens.tensor.shape[1] + 200):
        variant = pb.EmbeddingBundle()
        variant.CopyFrom(bundle)
        variant.images[0].tokens.CopyFrom(pad_tokens(tokens, size))
        images.append(client.generate(variant, seed=9, **FAST).data)
    assert images[0] == images[1] == images[2]


def test_encoder_pads_to_the_requested_bucket(client, picture):
    bundle = client.encode(picture, pad_to=1000)
    assert bundle.images[0].tokens.tensor.shape[1] == 1000
    assert client.generate(bundle, seed=1, **FAST).data == client.generate(client.encode(picture), seed=1,
                                                                          **FAST).data


def _generate_raw(servers, request: pb.GenerateRequest):
    with grpc.insecure_channel(servers["generator"].address) as channel:
        return list(pb_grpc.GeneratorStub(channel).Generate(request, timeout=60))


@pytest.mark.parametrize("field,value", [
    ("checkpoint_id", "0123456789abcdef"), ("joint_attention_dim", 4096), ("inner_dim", 3072),
])
def test_generator_refuses_a_bundle_of_another_model(client, servers, picture, field, value):
    bundle = client.encode(picture)
    setattr(bundle.fingerprint, field, value)
    request = pb.GenerateRequest(request_id="mismatch", mode=pb.VARIATION, bundle=bundle,
                                 params=pb.GenerationParams(seed=1, steps=1, width=64, height=48))
    with pytest.raises(grpc.RpcError) as error:
        _generate_raw(servers, request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "another model" in error.value.details()
    assert client.variation(picture, seed=1, **FAST).images  # still serving


@pytest.mark.parametrize("params,name", [
    (pb.GenerationParams(steps=0), "steps"), (pb.GenerationParams(steps=201), "steps"),
    (pb.GenerationParams(guidance=-1.0), "guidance"), (pb.GenerationParams(image_count=17), "image_count"),
    (pb.GenerationParams(aspect_ratio="5:4"), "aspect_ratio"), (pb.GenerationParams(width=70, height=48), "width"),
])
def test_bad_parameters_get_invalid_argument_naming_them(client, servers, picture, params, name):
    request = pb.GenerateRequest(request_id="bad", mode=pb.VARIATION, bundle=client.encode(picture), params=params)
    with pytest.raises(grpc.RpcError) as error:
        _generate_raw(servers, request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert name in error.value.details()


def test_both_servers_describe_themselves(client):
    info = client.info()
    assert info["encoder"].fingerprint == info["generator"].fingerprint
    assert info["encoder"].fingerprint.joint_attention_dim == 48 and info["generator"].fingerprint.inner_dim == 32
    for role, server in info.items():
        assert server.role == role and server.device == "cpu" and server.dtype == "float32"
        assert server.versions.api == "qwen2vl_flux.v1" and server.versions.torch
        assert server.limits.max_message_bytes >= 64 * 1024 * 1024
    assert "variation" in info["generator"].modes
