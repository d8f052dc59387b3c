"""The PNG writer the generator and the client use: same pixels as written, any reader, bytes
that do not depend on the machine."""
from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from qwen2vl_flux.client import png

CHANNELS = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}


def _image(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([(x * 3 + y + c * 40) % 256 for c in range(CHANNELS[mode])], -1)
    pixels = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == png.SIGNATURE
    out, at = [], 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0] == zlib.crc32(kind + body)
        out.append((kind, body))
        at += 12 + length
    return out


@pytest.mark.parametrize("mode", list(CHANNELS))
@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1), (333, 257), (1024, 600)])
def test_pixels_come_back_exactly(mode, size):
    image = _image(mode, size)
    for level in (0, 1, 9):
        back = Image.open(io.BytesIO(png.png_bytes(image, level)))
        back.load()
        assert (back.mode, back.size) == (mode, size)
        assert np.array_equal(np.asarray(back), np.asarray(image))


def test_strips_join_into_one_checked_zlib_stream():
    image = _image("RGB", (1024, 1024))
    row_bytes = 1024 * 3 + 1
    strips = -(-1024 // (png.STRIP_BYTES // row_bytes))
    assert strips > 8, "the image must span many strips for this test to mean anything"
    chunks = _chunks(png.png_bytes(image))
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    raw = zlib.decompress(chunks[1][1])   # checks the Adler-32 of the whole stream
    assert len(raw) == 1024 * row_bytes
    assert set(raw[::row_bytes]) == {1}   # every row filtered with Sub


def test_about_as_small_as_pillow():
    image = _image("RGB", (512, 512))
    pillow = io.BytesIO()
    image.save(pillow, format="PNG", compress_level=1)
    assert len(png.png_bytes(image)) < 1.1 * pillow.tell()


def test_bytes_do_not_depend_on_the_number_of_threads(monkeypatch):
    image = _image("RGBA", (800, 700))
    many = png.png_bytes(image)
    monkeypatch.setattr(png, "_pool", ThreadPoolExecutor(max_workers=1))
    assert png.png_bytes(image) == many


def test_text_chunks_read_back_latin1_and_beyond():
    text = {"qwen2vl-flux": '{"seed": 7}', "note": "caf\u00e9", "title": "\u732b\u306e\u7d75"}
    data = png.png_bytes(_image("RGB", (40, 30)), text=text)
    assert [kind for kind, _ in _chunks(data)] == [b"IHDR", b"tEXt", b"tEXt", b"iTXt", b"IDAT", b"IEND"]
    back = Image.open(io.BytesIO(data))
    assert {key: back.info[key] for key in text} == text


@pytest.mark.parametrize("mode", ["P", "1", "I;16"])
def test_other_modes_go_through_pillow(mode):
    image = _image("L", (37, 21)).convert(mode)
    back = Image.open(io.BytesIO(png.png_bytes(image, text={"k": "v"})))
    back.load()
    assert back.info["k"] == "v"
    assert np.array_equal(np.asarray(back.convert("L")), np.asarray(image.convert("L")))
