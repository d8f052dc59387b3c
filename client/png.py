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
from typing import TYPE_CHECKING

from PIL import Image, PngImagePlugin

if TYPE_CHECKING:
    import numpy as np

COLOUR_TYPES = {"L": 0, "LA": 4, "RGB": 2, "RGBA": 6}
STRIP_BYTES = 256 * 1024
WINDOW = 32 * 1024
SIGNATURE = b"\x89PNG\r\n\x1a\n"

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def png_bytes(image: Image.Image, level: int = 1, text: dict[str, str] | None = None) -> bytes:
    """`image` as a PNG file at zlib `level` (0-9), with `text` as tEXt (or iTXt) chunks."""
    if (image.mode not in COLOUR_TYPES or image.width == 0 or image.height == 0
            or "transparency" in image.info or "icc_profile" in image.info or not _has_numpy()):
        return _pillow_png(image, level, text)
    import numpy as np
    channels = len(image.mode)
    rows = np.ascontiguousarray(np.asarray(image)).reshape(image.height, image.width * channels)
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, COLOUR_TYPES[image.mode], 0, 0, 0)
    zlib_header, *strips, checksum = _zlib_stream(rows, channels, level)
    del rows   # the pixels' copy goes before the file is joined: peak memory about 2 x the image
    # one IDAT per deflated strip (a reader joins them), with zlib's header and checksum at the ends
    strips[0] = zlib_header + strips[0]
    strips[-1] = strips[-1] + checksum
    parts = [SIGNATURE, _chunk(b"IHDR", header)]
    parts += [_text_chunk(key, value) for key, value in (text or {}).items()]
    for strip in strips:
        parts += _chunk_parts(b"IDAT", strip)
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)


def _has_numpy() -> bool:
    """The client library itself needs only Pillow, and imports numpy at first use: without
    numpy, Pillow writes the PNGs."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


def filter_rows(rows: np.ndarray, above: np.ndarray, bpp: int) -> np.ndarray:
    """PNG-filtered rows (filter byte first): per row the filter of None, Sub, Up, Average and
    Paeth whose bytes, read as signed, have the smallest sum of absolute values. `above` is the
    row before the first (zeros at the top of the image). uint8 arithmetic wraps as PNG's does."""
    import numpy as np

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
    return -condition.view("u1")


def _zlib_stream(rows: np.ndarray, bpp: int, level: int) -> list[bytes]:
    """The zlib stream of the filtered rows, as pieces to join."""
    import numpy as np

    row_bytes = rows.shape[1] + 1
    rows_per_strip = max(1, STRIP_BYTES // row_bytes)
    starts = list(range(0, rows.shape[0], rows_per_strip))

    def filtered(start: int, stop: int) -> bytes:
        above = rows[start - 1] if start else np.zeros(rows.shape[1], np.uint8)
        return filter_rows(rows[start:stop], above, bpp).tobytes()

    def strip(index: int) -> tuple[bytes, int, int]:
        """One strip deflated, its Adler-32 and length. The strip's dictionary, the 32 KB before it,
        is filtered again here (each row's filter depends on it and the row above only), so no
        strip waits on another."""
        start = starts[index]
        stop = min(start + rows_per_strip, rows.shape[0])
        primed = {}
        if start:
            primed["zdict"] = filtered(max(0, start - -(-WINDOW // row_bytes)), start)[-WINDOW:]
        data = filtered(start, stop)
        compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, **primed)
        last = index == len(starts) - 1
        deflated = compressor.compress(data) + compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
        return deflated, zlib.adler32(data), len(data)

    strips = _run(strip, len(starts))
    adler = 1
    for _, strip_adler, length in strips:
        adler = adler32_combine(adler, strip_adler, length)
    # zlib's header (32 KB window; FLEVEL says how hard it tried) and the Adler-32 of all of it
    flag = {0: 0x01, 1: 0x01, 2: 0x5E, 3: 0x5E, 4: 0x5E, 5: 0x5E, 6: 0x9C}.get(level, 0xDA)
    return [bytes((0x78, flag)), *(deflated for deflated, _, _ in strips), struct.pack(">I", adler)]


def adler32_combine(first: int, second: int, second_length: int) -> int:
    """The Adler-32 of two byte strings joined, from theirs (zlib's adler32_combine)."""
    base = 65521
    rem = second_length % base
    low = (first & 0xFFFF) + (second & 0xFFFF) + base - 1
    high = (rem * (first & 0xFFFF)) % base + (first >> 16) + (second >> 16) + base - rem
    return (low % base) | ((high % base) << 16)


def _run(fn, count: int) -> list:
    """fn(0..count-1), in order: on the pool, or on the calling thread when there is one strip or
    the pool is gone (interpreter shutdown). No call waits on another, so the pool cannot deadlock."""
    if count > 1:
        try:
            futures = [_threads().submit(fn, i) for i in range(count)]
        except RuntimeError:   # "cannot schedule new futures after (interpreter) shutdown"
            pass
        else:
            return [future.result() for future in futures]
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
    return b"".join(_chunk_parts(kind, body))


def _chunk_parts(kind: bytes, body) -> list:
    """A chunk as pieces to join (length, type, body, CRC), so a large body is not copied twice."""
    return [struct.pack(">I", len(body)), kind, body, struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))]


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
