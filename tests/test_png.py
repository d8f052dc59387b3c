"""The PNG writer the generator and the client use: same pixels as written, any reader, bytes
that do not depend on the machine."""
from __future__ import annotations

import io
import os
import signal
import struct
import subprocess
import sys
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
@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1), (333, 257), (1024, 600), (90000, 3)])
def test_pixels_come_back_exactly(mode, size):
    image = _image(mode, size)
    for level in range(10):
        back = Image.open(io.BytesIO(png.png_bytes(image, level)))
        back.load()
        assert (back.mode, back.size) == (mode, size)
        assert np.array_equal(np.asarray(back), np.asarray(image))


def _picture(size=(1024, 1024)) -> Image.Image:
    from qwen2vl_flux.client.cli import DEMO_INPUT

    return Image.open(DEMO_INPUT).convert("RGB").resize(size, Image.LANCZOS)


def test_strips_join_into_one_checked_zlib_stream():
    image = _image("RGB", (1024, 1024))
    row_bytes = 1024 * 3 + 1
    assert 1024 // (png.STRIP_BYTES // row_bytes) > 8, "the image must span many strips"
    chunks = _chunks(png.png_bytes(image))
    kinds = [kind for kind, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and set(kinds[1:-1]) == {b"IDAT"}
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))   # checks Adler-32
    assert len(raw) == 1024 * row_bytes
    assert set(raw[::row_bytes]) <= {0, 1, 2, 3, 4}


@pytest.mark.parametrize("level", [1, 6])
def test_about_as_small_as_pillow(level):
    smooth = np.asarray(_picture(), dtype=np.float32)
    noisy = Image.fromarray((smooth + np.random.default_rng(0).normal(0, 2, smooth.shape)).clip(0, 255).astype(np.uint8))
    for image in (_picture(), noisy, _image("RGB", (512, 512))):
        pillow = io.BytesIO()
        image.save(pillow, format="PNG", compress_level=level)
        assert len(png.png_bytes(image, level)) < 1.1 * pillow.tell()


def test_filter_choice_is_libpng_heuristic():
    """Each row's filter is the one with the smallest sum of absolute signed bytes."""
    rows = np.asarray(_picture((64, 48))).reshape(48, 64 * 3)
    filtered = png.filter_rows(rows, np.zeros(64 * 3, np.uint8), 3)
    decoded = np.zeros_like(rows, dtype=np.int32)
    for y in range(48):   # the PNG decoder's arithmetic, written out
        kind, line = filtered[y, 0], filtered[y, 1:].astype(np.int32)
        for i in range(64 * 3):
            a = decoded[y, i - 3] if i >= 3 else 0
            b = decoded[y - 1, i] if y else 0
            c = decoded[y - 1, i - 3] if y and i >= 3 else 0
            p = a + b - c
            paeth = a if abs(p - a) <= min(abs(p - b), abs(p - c)) else b if abs(p - b) <= abs(p - c) else c
            decoded[y, i] = (line[i] + [0, a, b, (a + b) // 2, paeth][kind]) % 256
        x = rows.astype(np.int32)   # the encoder's side, byte by byte
        left = [x[y, i - 3] if i >= 3 else 0 for i in range(64 * 3)]
        up = [x[y - 1, i] if y else 0 for i in range(64 * 3)]
        corner = [x[y - 1, i - 3] if y and i >= 3 else 0 for i in range(64 * 3)]
        candidates = []
        for choice in range(5):
            line_out = []
            for i in range(64 * 3):
                a, b, c = left[i], up[i], corner[i]
                p = a + b - c
                paeth = a if abs(p - a) <= min(abs(p - b), abs(p - c)) else b if abs(p - b) <= abs(p - c) else c
                line_out.append((x[y, i] - [0, a, b, (a + b) // 2, paeth][choice]) % 256)
            candidates.append(line_out)
        costs = [sum(v if v < 128 else 256 - v for v in line_out) for line_out in candidates]
        assert kind == costs.index(min(costs))
        assert list(filtered[y, 1:]) == candidates[kind]
    assert np.array_equal(decoded, rows)


def test_bytes_do_not_depend_on_the_number_of_cpus(monkeypatch):
    image = _image("RGBA", (800, 700))
    files = []
    for cpus in (1, 2, 16):
        monkeypatch.setattr(png, "_pool", None)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        files.append(png.png_bytes(image))
        png._pool.shutdown()
    monkeypatch.setattr(png, "_run", lambda fn, count: [fn(i) for i in range(count)])   # no threads at all
    files.append(png.png_bytes(image))
    assert len(set(files)) == 1


def test_a_forked_child_writes_pngs_too():
    image = _image("RGB", (1024, 1024))
    expected = png.png_bytes(image)   # the parent's pool is up
    pid = os.fork()
    if pid == 0:   # the child: its copy of the pool has no threads
        same = False
        try:
            signal.alarm(60)
            same = png.png_bytes(image) == expected
        finally:
            os._exit(0 if same else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_failing_strip_leaves_the_pool_serving(monkeypatch):
    image = _image("RGB", (1024, 1024))
    expected = png.png_bytes(image)
    real = png.filter_rows
    rows = np.asarray(image).reshape(1024, 1024 * 3)
    second_strip = png.STRIP_BYTES // (1024 * 3 + 1)

    def second_strip_fails(strip_rows, above, bpp):
        """Only the second strip's own rows fail: the strips after it still filter theirs."""
        if len(strip_rows) == second_strip and np.array_equal(above, rows[second_strip - 1]):
            raise MemoryError("strip")
        return real(strip_rows, above, bpp)

    monkeypatch.setattr(png, "filter_rows", second_strip_fails)
    for _ in range(4):   # more failures than this machine has pool threads
        with pytest.raises(MemoryError):
            png.png_bytes(image)
    monkeypatch.setattr(png, "filter_rows", real)
    caller = ThreadPoolExecutor(1)
    try:
        assert caller.submit(png.png_bytes, image).result(timeout=60) == expected
    finally:
        caller.shutdown(wait=False)


def test_concurrent_calls_write_what_one_call_writes():
    images = [_image(mode, (700 + 37 * i, 500), seed=i) for i, mode in enumerate(["L", "LA", "RGB", "RGBA"] * 3)]
    alone = [png.png_bytes(image) for image in images]
    with ThreadPoolExecutor(8) as callers:
        assert list(callers.map(png.png_bytes, images)) == alone


def test_adler32_of_joined_strips():
    rng = np.random.default_rng(3)
    for _ in range(50):
        first, second = (rng.integers(0, 256, rng.integers(0, 300_000), dtype=np.uint8).tobytes() for _ in range(2))
        assert png.adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second)) == zlib.adler32(first + second)


def test_written_from_an_atexit_handler():
    code = ("import atexit, io, numpy as np; from PIL import Image; from qwen2vl_flux.client import png\n"
            "image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8))\n"
            "png.png_bytes(image)\n"
            "atexit.register(lambda: print(Image.open(io.BytesIO(png.png_bytes(image))).size))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(900, 900)"


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


def test_transparency_colour_and_icc_profile_are_kept():
    image = _image("RGB", (30, 20))
    image.info["transparency"] = (1, 2, 3)
    image.info["icc_profile"] = b"not checked by the writer"
    back = Image.open(io.BytesIO(png.png_bytes(image)))
    assert back.info["transparency"] == (1, 2, 3)
    assert back.info["icc_profile"] == b"not checked by the writer"
