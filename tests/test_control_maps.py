"""Control maps (depth, line, denoise) on the tiny control weights, in process (no servers)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

cv2 = pytest.importorskip("cv2")
torch = pytest.importorskip("torch")

from qwen2vl_flux.checkpoints import CheckpointLayout  # noqa: E402
from qwen2vl_flux.checkpoints.tiny_control import write_tiny_control_weights  # noqa: E402
from qwen2vl_flux.client.errors import InvalidArgument  # noqa: E402
from qwen2vl_flux.encoder_server import control_maps as cm  # noqa: E402

SEED = 4242
# Anyline runs at detect_resolution 1280 in service; 256 keeps these tests fast (same code path).
FAST = 256


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> CheckpointLayout:
    layout = CheckpointLayout(tmp_path_factory.mktemp("control"))
    write_tiny_control_weights(layout, SEED)
    return layout


@pytest.fixture(scope="module")
def mapper(layout) -> cm.ControlMapper:
    return cm.ControlMapper(layout, anyline_resolution=FAST)


@pytest.fixture(scope="module")
def depth_raw(mapper) -> np.ndarray:
    """The raw depth of picture(64, 80), computed once (each tiny forward costs ~1.5 s on 2 CPU cores)."""
    return mapper.depth_array(picture(64, 80))


def picture(width: int = 72, height: int = 56) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, ((xx // 8 + yy // 8) % 2) * 200 + 20], axis=2)
    rgb[height // 4: height // 2, width // 3: width // 2] = (250, 250, 250)
    return Image.fromarray(rgb.astype(np.uint8))


def test_tiny_weights_are_small_and_in_the_published_places(layout):
    pth = layout.depth_anything / cm.DEPTH_PTH_NAME
    assert pth.stat().st_size < 1_000_000 and layout.anyline.stat().st_size < 300_000
    sd = torch.load(pth, weights_only=True)
    assert "pretrained.blocks.0.attn.qkv.weight" in sd and "depth_head.scratch.refinenet4.out_conv.weight" in sd
    teed = cm.load_teed(layout.anyline)  # strict load into our TEED
    assert sum(p.numel() for p in teed.parameters()) == 58_910  # controlnet_aux TED's count


def test_depth_map_is_min_max_normalised_rgb_of_the_input_size(depth_raw):
    assert depth_raw.shape == (80, 64) and depth_raw.dtype == np.float32
    depth = cm.depth_to_image(depth_raw)  # what mapper.depth returns (its full path: the next test)
    assert depth.mode == "RGB" and depth.size == (64, 80)
    arr = np.array(depth)
    assert arr.min() == 0 and arr.max() == 255
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    # the original's normalisation: (d - min) / (max - min) * 255, truncated
    expected = ((depth_raw - depth_raw.min()) / (depth_raw.max() - depth_raw.min()) * 255).astype(np.uint8)
    assert np.array_equal(arr[..., 0], expected)
    flat = cm.depth_to_image(np.full((4, 5), 3.0, np.float32))  # the original would divide 0 by 0
    assert np.array(flat).max() == 0


def test_depth_preprocessing_follows_depth_anything_resize():
    # Resize(518, keep_aspect_ratio, lower_bound, ensure_multiple_of=14): short side 518, multiples of 14
    assert cm.depth_input_size(1024, 1024) == (518, 518)
    assert cm.depth_input_size(1344, 768) == (910, 518)
    assert cm.depth_input_size(72, 56) == (672, 518)
    assert cm.depth_input_size(300, 1000) == (518, 1722)
    pixels = cm.depth_pixel_values(np.full((56, 72, 3), 124, np.uint8))
    assert pixels.shape == (1, 3, 518, 672) and pixels.dtype == torch.float32
    expected = (124 / 255.0 - np.array(cm.IMAGENET_MEAN)) / np.array(cm.IMAGENET_STD)
    assert np.allclose(pixels[0, :, 10, 10].numpy(), expected, atol=1e-6)


def test_converted_checkpoint_equals_in_memory_conversion(layout, mapper, depth_raw, tmp_path):
    hf = CheckpointLayout(tmp_path)
    out = cm.convert_depth_anything(layout.depth_anything / cm.DEPTH_PTH_NAME, hf.depth_anything)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert not (hf.depth_anything / cm.DEPTH_PTH_NAME).exists()  # the HF format alone is enough
    converted = cm.ControlMapper(hf)
    a, b = mapper._depth().state_dict(), converted._depth().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # deterministic across loads and formats: the same map, through the public depth()
    depth = converted.depth(picture(64, 80))
    assert depth.size == (64, 80) and np.array_equal(np.array(depth), np.array(cm.depth_to_image(depth_raw)))


def test_depth_without_weights_says_what_to_send_instead(tmp_path):
    """A caller's request this server cannot serve (INVALID_ARGUMENT with what to do), not a crash."""
    with pytest.raises(InvalidArgument, match="no depth model .*depth-anything-v2 is absent.*--control-map depth="):
        cm.ControlMapper(CheckpointLayout(tmp_path)).depth(picture())


def test_anyline_runs_with_auto(mapper):
    assert mapper.line_detectors() == ["anyline", "canny"]
    image = picture()
    line, name = mapper.line(image)  # auto
    assert name == "anyline" and line.mode == "RGB" and line.size == image.size
    assert 0 < np.array(line).std()


def test_canny_is_cv2_canny_of_the_grey_image(mapper):
    image = picture()
    line, name = mapper.line(image, "canny")
    assert name == "canny" and line.mode == "RGB" and line.size == image.size
    grey = cv2.cvtColor(np.array(image), cv2.COLOR_RGB2GRAY)
    expected = cv2.Canny(grey, 50, 150)
    assert expected.any()
    assert all(np.array_equal(np.array(line)[..., c], expected) for c in range(3))


def test_auto_without_mteed_is_canny_and_anyline_names_the_missing_file(layout, tmp_path):
    shutil.copytree(layout.depth_anything, tmp_path / layout.depth_anything.name)
    mapper = cm.ControlMapper(CheckpointLayout(tmp_path))
    assert mapper.line_detectors() == ["canny"]
    assert mapper.line(picture(), "auto")[1] == "canny"
    with pytest.raises(InvalidArgument, match="MTEED.pth") as err:
        mapper.line(picture(), "anyline")
    assert err.value.parameter == "line_detector"


def test_unknown_detector_is_invalid_argument(mapper):
    with pytest.raises(InvalidArgument) as err:
        mapper.line(picture(), "sobel")
    assert err.value.parameter == "line_detector"


def test_remove_small_objects_counts_the_three_equal_channels_like_skimage():
    ndi = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    plane = rng.random((64, 64)) < 0.35
    mask = np.repeat(plane[:, :, None], 3, axis=2)
    # skimage.morphology.remove_small_objects(mask, min_size=36, connectivity=1), done with scipy
    labels, _ = ndi.label(mask, ndi.generate_binary_structure(3, 1))
    expected = mask & (np.bincount(labels.ravel()) >= 36)[labels]
    ours = cm.remove_small_objects(mask, 36)
    assert np.array_equal(ours, expected)
    assert ours.any() and not np.array_equal(ours, mask)


def test_denoise_blurs():
    image = picture()
    assert cm.denoise_map(image, 0) is image

    def high_frequency(img):
        a = np.asarray(img, dtype=np.float64)
        return np.abs(np.diff(a, axis=0)).sum() + np.abs(np.diff(a, axis=1)).sum()

    blurred = cm.denoise_map(image, 2.5)
    assert blurred.size == image.size and blurred.mode == image.mode
    assert high_frequency(blurred) < 0.7 * high_frequency(image)
    with pytest.raises(InvalidArgument) as err:
        cm.denoise_map(image, -1)
    assert err.value.parameter == "denoise_radius"
