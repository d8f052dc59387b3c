"""All five modes through the two server processes, against in-process oracles
built from stock parts (tests/reference.py) on the same tiny checkpoint."""
from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl_flux.client import InvalidArgument
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb
from qwen2vl_flux.v1 import qwen2vl_flux_pb2_grpc as pb_grpc
from reference import (load_models, reference_controlnet, reference_controlnet_inpaint, reference_img2img,
                       reference_inpaint, reference_resize)
from pictures import picture
from test_inputs import exif_rotated_jpeg


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return picture(width, height, seed, discs=4)


def _mask(width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return mask


def _maps(size) -> dict[str, Image.Image]:
    """Ready-made control maps: any RGB pictures of image a's resized size."""
    return {"depth": _picture(*size, seed=5).convert("L").convert("RGB"),
            "line": _picture(*size, seed=6).convert("L").point(lambda v: 255 * (v > 128)).convert("RGB")}


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _assert_equal_images(served, expected, tolerance=1):
    assert len(served) == len(expected)
    for s, e in zip(served, expected):
        assert s.size == e.size
        assert np.abs(_pixels(s) - _pixels(e)).max() <= tolerance


A = _picture(100, 80, seed=1)
B = _picture(72, 96, seed=2)
MASK = _mask(100, 80)
COMMON = dict(seed=21, steps=4, strength=0.5)


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "controlnet", "controlnet-inpaint"])
def test_odd_input_sizes_and_batches(client, mode):
    image = _picture(1000, 667)
    kwargs = dict(steps=1, image_count=2, seed=1)
    if mode in ("inpaint", "controlnet-inpaint"):
        kwargs["mask"] = _mask(1000, 667)
    if mode.startswith("controlnet"):
        kwargs["control_maps"] = _maps((1000, 664))
    result = client.run(mode, image, **kwargs)
    assert [im.size for im in result.images] == [(992, 656), (992, 656)]


@pytest.mark.parametrize("reference,focus,prompt", [(None, None, ""), (B, (0.4, 0.5, 0.3), "a green square")])
def test_img2img_matches_the_stock_pipeline(client, tiny_checkpoints, reference, focus, prompt):
    served = client.img2img(A, reference=reference, focus=focus, prompt=prompt, image_count=2, **COMMON).images
    expected = reference_img2img(str(tiny_checkpoints), A, reference=reference, focus=focus, prompt=prompt,
                                 image_count=2, **COMMON)
    _assert_equal_images(served, expected)


@pytest.mark.parametrize("reference", [None, B])
def test_inpaint_matches_the_stock_pipeline(client, tiny_checkpoints, reference):
    served = client.inpaint(A, mask=MASK, reference=reference, **COMMON).images
    expected = reference_inpaint(str(tiny_checkpoints), A, MASK, reference=reference, **COMMON)
    _assert_equal_images(served, expected)


@pytest.mark.parametrize("corrected", [False, True])
@pytest.mark.parametrize("reference,flags", [(None, {}), (B, {"depth": False}), (None, {"depth": False, "line": False})])
def test_controlnet_matches_the_reference_loop(client, tiny_checkpoints, reference, flags, corrected):
    maps = _maps(reference_resize(A).size)
    served = client.controlnet(A, reference=reference, control_maps=maps, image_count=2,
                               corrected_controlnet=corrected, depth_strength=0.6, **flags, **COMMON).images
    expected = reference_controlnet(str(tiny_checkpoints), A, maps["depth"], maps["line"], reference=reference,
                                    image_count=2, corrected=corrected, depth_strength=0.6,
                                    use_depth=flags.get("depth", True), use_line=flags.get("line", True), **COMMON)
    _assert_equal_images(served, expected)


@pytest.mark.parametrize("corrected", [False, True])
def test_controlnet_inpaint_matches_the_reference_loop(client, tiny_checkpoints, corrected):
    maps = _maps(reference_resize(A).size)
    served = client.controlnet_inpaint(A, mask=MASK, reference=B, control_maps=maps, prompt="stripes",
                                       corrected_controlnet=corrected, **COMMON).images
    expected = reference_controlnet_inpaint(str(tiny_checkpoints), A, MASK, maps["depth"], maps["line"],
                                            reference=B, prompt="stripes", corrected=corrected, **COMMON)
    _assert_equal_images(served, expected)


def test_controlnet_quirks_change_the_image(client):
    maps = _maps(reference_resize(A).size)
    quirk = client.controlnet(A, control_maps=maps, **COMMON)
    fixed = client.controlnet(A, control_maps=maps, corrected_controlnet=True, **COMMON)
    assert quirk.data != fixed.data
    assert quirk.parameters["corrected_controlnet"] is False and fixed.parameters["corrected_controlnet"] is True


def test_inpaint_keeps_what_the_mask_keeps(client, tiny_checkpoints):
    """Outside the mask the latents end as the input's own, so the output stays near the
    VAE round trip of the input (the tiny VAE's attention blurs this at pixel level, so
    img2img with the same seed and strength is the baseline); inside it changes."""
    from diffusers.image_processor import VaeImageProcessor

    image, mask = _picture(128, 128, seed=3), _mask(128, 128)
    params = dict(seed=4, steps=4, strength=0.9)
    inpainted = _pixels(client.inpaint(image, mask=mask, **params).images[0])
    repainted = _pixels(client.img2img(image, **params).images[0])
    # The VAE round trip of the input, with the same first random draw as the request.
    vae, processor = load_models(str(tiny_checkpoints))["vae"], VaeImageProcessor(vae_scale_factor=16)
    with torch.no_grad():
        pixels = processor.preprocess(image, height=128, width=128)
        latents = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(4))
        round_trip = _pixels(processor.postprocess(vae.decode(latents).sample, output_type="pil")[0])
    inside = np.zeros((128, 128), bool)
    inside[40:88, 40:88] = True                 # well inside the 32..96 repaint square
    outside = np.ones((128, 128), bool)
    outside[16:112, 16:112] = False             # well away from it
    kept = np.abs(inpainted - round_trip).mean(axis=-1)
    baseline = np.abs(repainted - round_trip).mean(axis=-1)
    assert np.median(kept[outside]) < 0.5 * np.median(baseline[outside])
    assert np.median(kept[inside]) > 2 * np.median(kept[outside])


def test_ready_made_maps_give_the_same_image_as_computed_ones(client):
    computed = client.control_maps(A)
    assert set(computed.maps) == {"depth", "line"} and computed.detectors["line"] in ("anyline", "canny")
    assert all(m.size == reference_resize(A).size for m in computed.maps.values())
    served = client.controlnet(A, **COMMON)
    ready = client.controlnet(A, control_maps=computed.maps, **COMMON)
    assert served.data == ready.data


def test_line_detector_choice_is_reported(client):
    canny = client.control_maps(A, kinds=["line"], line_detector="canny")
    assert canny.detectors == {"line": "canny"}
    blurred = client.control_maps(A, kinds=["line"], line_detector="canny", denoise_radius=2)
    assert _pixels(blurred.maps["line"]).std() < _pixels(canny.maps["line"]).std()


def test_user_images_are_accepted_and_oriented(client):
    rotated = client.img2img(exif_rotated_jpeg(), steps=1, seed=1)
    assert rotated.images[0].size == (32, 48)             # shown 40x60 -> 40x56 -> floor 16
    rgba = Image.new("RGBA", (64, 48), (200, 30, 30, 255))
    rgba.paste((0, 0, 0, 0), (16, 16, 48, 32))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert client.inpaint(buf.getvalue(), mask_from_alpha=True, steps=1, seed=1).images[0].size == (64, 48)
    deep = Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16))
    buf = io.BytesIO()
    deep.save(buf, format="PNG")
    assert client.variation(buf.getvalue(), steps=1, width=32, height=32, seed=1).images[0].size == (32, 32)


def _raw_generate(servers, request):
    with grpc.insecure_channel(servers["generator"].address) as channel:
        return list(pb_grpc.GeneratorStub(channel).Generate(request, timeout=60))


@pytest.mark.parametrize("mutate,name", [
    (lambda r: setattr(r, "mode", 9), "mode"),
    (lambda r: r.params.MergeFrom(pb.GenerationParams(strength=0.0)), "strength"),
    (lambda r: r.params.MergeFrom(pb.GenerationParams(strength=1.01)), "strength"),
    (lambda r: r.ClearField("init_image"), "init_image"),
    (lambda r: setattr(r.mask, "data", _png(_mask(50, 50))), "mask"),   # not image a's shape
    (lambda r: r.ClearField("mask"), "mask"),
])
def test_bad_generation_inputs_get_invalid_argument(client, servers, mutate, name):
    request = pb.GenerateRequest(request_id="bad", mode=pb.INPAINT, bundle=client.encode(A, mode="inpaint"),
                                 params=pb.GenerationParams(steps=1, seed=1),
                                 init_image=pb.ImageData(data=_png(A)), mask=pb.ImageData(data=_png(MASK)))
    mutate(request)
    with pytest.raises(grpc.RpcError) as error:
        _raw_generate(servers, request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert name in error.value.details()
    assert client.inpaint(A, mask=MASK, steps=1, seed=1).images     # and the next good request works


@pytest.mark.parametrize("focus,name", [((1.2, 0.5, 0.3), "center_x"), ((0.5, 0.5, 0.0), "radius")])
def test_bad_focus_gets_invalid_argument_from_the_encoder(client, servers, focus, name):
    request = pb.EncodeRequest(request_id="bad-focus", images=[pb.EncoderImage(
        image=pb.ImageData(data=_png(A)), role="a", focus=pb.Focus(center_x=focus[0], center_y=focus[1],
                                                                   radius=focus[2]))])
    with grpc.insecure_channel(servers["encoder"].address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            pb_grpc.EncoderStub(channel).Encode(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in error.value.details()
    assert client.encode(A).images


def test_controlnet_without_maps_or_weights_is_explained(client, servers):
    request = pb.GenerateRequest(request_id="nomaps", mode=pb.CONTROLNET, bundle=client.encode(A),
                                 params=pb.GenerationParams(steps=1, seed=1), init_image=pb.ImageData(data=_png(A)))
    with pytest.raises(grpc.RpcError) as error:
        _raw_generate(servers, request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "depth map" in error.value.details()
    with pytest.raises(InvalidArgument, match="line_detector"):
        client.control_maps(A, line_detector="sobel")


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_cli_generates_every_mode_and_writes_control_maps(servers, tmp_path):
    import subprocess
    import sys

    a, mask = tmp_path / "a.png", tmp_path / "mask.png"
    A.save(a)
    MASK.save(mask)
    common = [sys.executable, "-m", "qwen2vl_flux.client.cli"]
    addresses = ["--encoder", servers["encoder"].address, "--generator", servers["generator"].address]
    run = subprocess.run(common + ["generate", "--mode", "controlnet-inpaint", "--input", str(a), "--mask", str(mask),
                                   "--steps", "1", "--seed", "3", "--no-depth", "--line-detector", "canny",
                                   "--out", str(tmp_path / "out")] + addresses,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == [str(tmp_path / "out" / "a-controlnet-inpaint-3-0.png")]   # names its mode
    maps = subprocess.run(common + ["control-maps", "--input", str(a), "--out", str(tmp_path / "maps"),
                                    "--line-detector", "canny", "--encoder", servers["encoder"].address],
                          capture_output=True, text=True, timeout=120)
    assert maps.returncode == 0, maps.stderr[-2000:]
    assert sorted(line.split("\t")[1] for line in maps.stdout.splitlines()) == ["canny", "depth-anything-v2"]
    bad = subprocess.run(common + ["generate", "--mode", "img2img", "--input", str(a), "--strength", "2"] + addresses,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "strength" in bad.stderr
