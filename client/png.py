"""PNG files written in strips on several threads: the same pixels as Pillow's PNG writer, files
within a few percent of its size, in a fraction of its time (BENCHMARKS.md, image encoding).

Pillow filters and deflates the whole image on one thread. Here the rows are cut into strips of a
fixed size, and each strip is filtered and deflated on a thread of its own (numpy and zlib let go of
the GIL). Each row gets the filter with the smallest sum of absolute values, libpng's heuristic. Each
strip's compressor is primed with the 32 KB before it, as pigz does, so the strips join into one
deflate stream that any PNG reader takes. Strips do not depend on the number of CPUs, so neither
do a file's bytes (for one zlib build). Images that are not 8-bit L, LA, RGB or RGBA, or that carry
a transparency colour or an ICC profile, go through Pillow."""
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
IDAT_BYTES = 1 << 20
SIGNATURE = b"\x89PNG\r\n\x1a\n"

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def png_bytes(image: Image.Image, level: int = 1, text: dict[str, str] | None = None) -> bytes:
    """`image` as a PNG file at zlib `level` (0-9), with `text` as tEXt (or iTXt) chunks."""
    if (image.mode not in COLOUR_TYPES or image.width == 0 or image.height == 0
            or "transparency" in image.info or "icc_profile" in image.info):
        return _pillow_png(image, level, text)
    channels = len(image.mode)
    rows = np.ascontiguousarray(np.asarray(image)).reshape(image.height, image.width * channels)
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, COLOUR_TYPES[image.mode], 0, 0, 0)
    stream = _zlib_stream(rows, channels, level)
    chunks = [_chunk(b"IHDR", header)]
    chunks += [_text_chunk(key, value) for key, value in (text or {}).items()]
    chunks += [_chunk(b"IDAT", stream[at:at + IDAT_BYTES]) for at in range(0, len(stream), IDAT_BYTES)]
    chunks.append(_chunk(b"IEND", b""))
    return SIGNATURE + b"".join(chunks)


def filter_rows(rows: np.ndarray, above: np.ndarray, bpp: int) -> np.ndarray:
    """PNG-filtered rows (filter byte first): per row the filter of None, Sub, Up, Average and
    Paeth whose bytes, read as signed, have the smallest sum of absolute values. `above` is the
    row before the first (zeros at the top of the image). uint8 arithmetic wraps as PNG's does."""
    h, width = rows.shape
    b = np.vstack([above[None], rows[:-1]])                     # the byte above
    a = np.zeros_like(rows)                                     # the byte a pixel to the left
    a[:, bpp:] = rows[:, :-bpp]
    c = np.zeros_like(rows)                                     # above and to the left
    c[:, bpp:] = b[:, :-bpp]
    candidates = np.empty((5, h, width), np.uint8)
    candidates[0] = rows
    np.subtract(rows, a, out=candidates[1])
    np.subtract(rows, b, out=candidates[2])
    np.subtract(rows, (a & b) + ((a ^ b) >> 1), out=candidates[3])   # floor((a + b) / 2) in 8 bits
    # Paeth, in 8 bits: with p = a + b - c, |p - a| = |b - c| and |p - b| = |a - c|; |p - c| is their
    # sum when b - c and a - c have one sign (then not below either), else their difference.
    pa = np.maximum(b, c) - np.minimum(b, c)
    pb = np.maximum(a, c) - np.minimum(a, c)
    same_sign = (b >= c) == (a >= c)
    difference = np.maximum(pa, pb) - np.minimum(pa, pb)
    pick_a = _byte_mask((pa <= pb) & (same_sign | (pa <= difference)))
    pick_b = _byte_mask(same_sign | (pb <= difference))
    predicted = c ^ ((c ^ b) & pick_b)
    predicted ^= (predicted ^ a) & pick_a
    np.subtract(rows, predicted, out=candidates[4])
    cost = np.minimum(candidates, np.negative(candidates)).sum(axis=2, dtype=np.int32)   # |byte as signed|
    best = cost.argmin(axis=0)
    out = np.empty((h, width + 1), np.uint8)
    out[:, 0] = best
    out[:, 1:] = candidates[best, np.arange(h)]
    return out


def _byte_mask(condition: np.ndarray) -> np.ndarray:
    """0xFF where `condition`, 0 elsewhere: a select by bit operations, faster than np.where."""
    return np.negative(condition.view(np.uint8))


def _zlib_stream(rows: np.ndarray, bpp: int, level: int) -> bytes:
    rows_per_strip = max(1, STRIP_BYTES // (rows.shape[1] + 1))
    starts = list(range(0, rows.shape[0], rows_per_strip))
    filtered: list[bytes | None] = [None] * len(starts)
    done = [threading.Event() for _ in starts]

    def strip(index: int) -> bytes:
        start = starts[index]
        above = rows[start - 1] if start else np.zeros(rows.shape[1], np.uint8)
        filtered[index] = filter_rows(rows[start:start + rows_per_strip], above, bpp).tobytes()
        done[index].set()
        primed = {}
        if index:   # the window before this strip: the end of the previous strip's filtered bytes
            done[index - 1].wait()
            primed = {"zdict": filtered[index - 1][-WINDOW:]}
        compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, **primed)
        last = index == len(starts) - 1
        return compressor.compress(filtered[index]) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)

    strips = _run(strip, len(starts))
    adler = 1
    for piece in filtered:
        adler = zlib.adler32(piece, adler)
    # zlib's header (32 KB window; FLEVEL says how hard it tried) and the Adler-32 of all of it
    flag = {0: 0x01, 1: 0x01, 2: 0x5E, 3: 0x5E, 4: 0x5E, 5: 0x5E, 6: 0x9C}.get(level, 0xDA)
    return bytes((0x78, flag)) + b"".join(strips) + struct.pack(">I", adler)


def _run(fn, count: int) -> list[bytes]:
    """fn(0..count-1) on the pool, in order; on the calling thread when there is one strip or the
    pool is gone (interpreter shutdown). Strip i waits only on strip i-1's filtering, which the pool
    started earlier, so the pool cannot deadlock."""
    if count > 1:
        try:
            return list(_threads().map(fn, range(count)))
        except RuntimeError:   # "cannot schedule new futures after (interpreter) shutdown"
            pass
    return [fn(i) for i in range(count)]


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            _pool = ThreadPoolExecutor(max_workers=cpus, thread_name_prefix="png-deflate")
        return _pool


def _forget_pool() -> None:
    """In a forked child the pool's threads are gone: start afresh."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


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
