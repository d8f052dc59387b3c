"""Images as users send them: EXIF orientation, alpha, palettes, CMYK, 16 bit, bad bytes."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from qwen2vl_flux.client.errors import InvalidArgument
from qwen2vl_flux.client.images import alpha_mask, decode_image, decode_mask, resize_for_generation


def _bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """Stored 60 wide x 40 high, red left half; EXIF orientation 6 = shown rotated 90 degrees clockwise."""
    stored = Image.new("RGB", (60, 40), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 30, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _bytes(stored, "JPEG", exif=exif, quality=95)


def test_exif_orientation_is_applied():
    image = decode_image(exif_rotated_jpeg())
    assert image.size == (40, 60)
    top, bottom = np.asarray(image)[5, 20], np.asarray(image)[55, 20]
    assert top[0] > 200 and top[2] < 60      # the stored left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_rgba_is_composited_on_white_and_its_alpha_is_a_mask():
    rgba = Image.new("RGBA", (32, 16), (10, 200, 10, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 16, 16))
    data = _bytes(rgba, "PNG")
    rgb = np.asarray(decode_image(data))
    assert rgb.shape == (16, 32, 3) and tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[0, 31]) == (10, 200, 10)
    mask = np.asarray(alpha_mask(data))
    assert mask[0, 0] == 255 and mask[0, 31] == 0     # transparent = repaint


def test_sixteen_bit_palette_and_cmyk_become_rgb():
    ramp = Image.fromarray((np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16))
    grey = np.asarray(decode_image(_bytes(ramp, "PNG")))
    assert grey.shape == (8, 8, 3) and grey[0, 0, 0] == 0 and grey[7, 7, 0] == round(63000 / 257)
    palette = Image.new("P", (4, 4), 3)
    palette.putpalette([0, 0, 0, 1, 1, 1, 2, 2, 2, 200, 100, 50] + [0] * 756)
    assert tuple(np.asarray(decode_image(_bytes(palette, "PNG")))[0, 0]) == (200, 100, 50)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert decode_image(_bytes(cmyk, "JPEG")).mode == "RGB"
    assert decode_mask(_bytes(Image.new("RGB", (4, 4), (255, 255, 255)), "PNG")).mode == "L"


@pytest.mark.parametrize("data,match", [
    (b"", "empty"), (b"not an image at all", "not a readable image"),
    (_bytes(Image.new("RGB", (4, 4)), "PNG")[:40], "not a readable image"),
])
def test_bad_bytes_are_named(data, match):
    with pytest.raises(InvalidArgument, match=match):
        decode_image(data, "image")


def test_pixel_cap_refuses_before_decoding():
    with pytest.raises(InvalidArgument, match="at most 100"):
        decode_image(_bytes(Image.new("RGB", (20, 20)), "PNG"), "image", max_pixels=100)


def test_alpha_mask_without_alpha_is_refused():
    with pytest.raises(InvalidArgument, match="no alpha"):
        alpha_mask(_bytes(Image.new("RGB", (4, 4)), "PNG"))


@pytest.mark.parametrize("size,expected", [((1000, 667), (1000, 664)), ((2000, 1500), (1176, 880)),
                                           ((64, 48), (64, 48))])
def test_resize_rule(size, expected):
    assert resize_for_generation(Image.new("RGB", size)).size == expected
