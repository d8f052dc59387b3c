"""PNG files written in strips on several threads: the same pixels as Pillow's PNG, in about a
third of the time on one core and a fraction of that on many (bench/probe.py --sections png).

Pillow tries five row filters per row and deflates the whole image on one thread. Here every row
gets the Sub filter (one numpy pass), and the rows are deflated in strips of a fixed size, each
strip on a thread of its own and primed with the 32 KB before it, as pigz does: the strips join
into one deflate stream, a file any PNG reader takes. The strip size does not depend on the
machine, so a file's bytes do not either. Modes other than 8-bit L, LA, RGB and RGBA go through
Pillow."""
from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, PngImagePlugin

COLOUR_TYPES = {"L": 0, "LA": 4, "RGB": 2, "RGBA": 6}
STRIP_BYTES = 256 * 1024
WINDOW = 32 * 1024
SIGNATURE = b"\x89PNG\r\n\x1a\n"

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def png_bytes(image: Image.Image, level: int = 1, text: dict[str, str] | None = None) -> bytes:
    """`image` as a PNG file at zlib `level` (0-9), with `text` as tEXt (or iTXt) chunks."""
    if image.mode not in COLOUR_TYPES or image.width == 0 or image.height == 0:
        return _pillow_png(image, level, text)
    channels = len(image.mode)
    rows = np.asarray(image).reshape(image.height, image.width * channels)
    filtered = np.empty((image.height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = 1   # Sub: each byte minus the same byte of the pixel to its left
    filtered[:, 1:1 + channels] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=filtered[:, 1 + channels:])
    data = memoryview(filtered.reshape(-1))

    header = struct.pack(">IIBBBBB", image.width, image.height, 8, COLOUR_TYPES[image.mode], 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    chunks += [_text_chunk(key, value) for key, value in (text or {}).items()]
    chunks += [_chunk(b"IDAT", _zlib_stream(data, filtered.shape[1], level)), _chunk(b"IEND", b"")]
    return SIGNATURE + b"".join(chunks)


def _zlib_stream(data: memoryview, row_bytes: int, level: int) -> bytes:
    rows_per_strip = max(1, STRIP_BYTES // row_bytes)
    starts = list(range(0, len(data), rows_per_strip * row_bytes))

    def deflate(index: int) -> bytes:
        start = starts[index]
        end = starts[index + 1] if index + 1 < len(starts) else len(data)
        primed = {"zdict": data[max(0, start - WINDOW):start]} if start else {}
        compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, **primed)
        last = index == len(starts) - 1
        return compressor.compress(data[start:end]) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    strips = list(_threads().map(deflate, range(len(starts)))) if len(starts) > 1 else [deflate(0)]
    # zlib's header (32 KB window; FLEVEL says how hard it tried) and the Adler-32 of all of it
    flag = {0: 0x01, 1: 0x01, 2: 0x5E, 3: 0x5E, 4: 0x5E, 5: 0x5E, 6: 0x9C}.get(level, 0xDA)
    return bytes((0x78, flag)) + b"".join(strips) + struct.pack(">I", zlib.adler32(data))


def _threads() -> ThreadPoolExecutor:
    """One pool for the process: zlib lets go of the GIL, so strips deflate side by side."""
    global _pool
    with _pool_lock:
        if _pool is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            _pool = ThreadPoolExecutor(max_workers=cpus, thread_name_prefix="png-deflate")
        return _pool


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


def _text_chunk(key: str, value: str) -> bytes:
    try:
        return _chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:   # not Latin-1: international text, uncompressed, no language tag
        return _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def _pillow_png(image: Image.Image, level: int, text: dict[str, str] | None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=level)
    return buf.getvalue()
