"""Image bytes in and out, as users send them. Torch-free; used by client and servers."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from .errors import InvalidArgument
from .modes import generation_size
from .png import png_bytes

# Beyond this an upload is refused before it is decoded (decompression bombs).
DEFAULT_MAX_PIXELS = 40_000_000
# Formats users send (MPO: phone photos; GIF and TIFF: first frame). No other PIL plugin
# is ever asked to parse an upload (EPS would reach Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "TIFF", "GIF")
_OPENERS = tuple(f for f in IMAGE_FORMATS if f != "MPO")   # PIL opens MPO through its JPEG plugin


def image_bytes(image: "Image.Image | bytes | str | Path") -> bytes:
    """Bytes to send for an image: files as they are (lossless, smallest), PIL images as PNG.
    A file that is not an image is refused here, by its name, before anything travels."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, Path)):
        data = Path(image).read_bytes()
        check_readable(data, str(image))
        return data
    if isinstance(image, Image.Image):
        return png_bytes(image)
    raise TypeError(f"expected a PIL image, bytes or a path, got {type(image).__name__}")


def check_readable(data: bytes, name: str) -> None:
    """The header only: is this a format Pillow reads? (cheap; decoding is the server's job)."""
    if not data:
        raise InvalidArgument(name, f"{name} is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)):
            pass
    except Image.UnidentifiedImageError:
        raise InvalidArgument(name, f"{name} is not an image file Pillow can read (it starts with "
                                    f"{data[:12]!r}); give a PNG, JPEG or WebP file") from None
    except Exception as e:  # noqa: BLE001 - a truncated header and the like
        raise InvalidArgument(name, f"{name} is not a readable image ({type(e).__name__}: {e})") from None


def decode_image(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an uploaded image to RGB: EXIF orientation applied, alpha composited
    on white, palette/CMYK/16-bit/greyscale converted."""
    image = _open(data, name, max_pixels)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return image.convert("I").point(lambda v: v * (1 / 257)).convert("L").convert("RGB")
    return image.convert("RGB")


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    if not data:
        raise InvalidArgument(name, f"{name} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.init()   # registers every plugin, so `formats` can name them
            image = Image.open(io.BytesIO(data), formats=_OPENERS)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidArgument(name, f"{name} is {width}x{height} = {width * height} pixels; "
                                            f"this server accepts at most {max_pixels}")
            image.load()
    except InvalidArgument:
        raise
    except Image.UnidentifiedImageError:
        other = _format_name(data)
        if other:
            raise InvalidArgument(name, f"{name} is {other}, which this server does not accept; send "
                                        f"{', '.join(IMAGE_FORMATS)}") from None
        raise InvalidArgument(name, f"{name} is not a readable image (accepted: {', '.join(IMAGE_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidArgument(name, f"{name} refused as a decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:  # its message names a BytesIO object, not the upload
        raise InvalidArgument(name, f"{name} is not a readable image: its bytes (starting {data[:12]!r}) are "
                                    "in no format this server decodes; send PNG, JPEG or WebP") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise InvalidArgument(name, f"{name} is not a readable image ({type(e).__name__}: {e})") from None
    if image.size[0] == 0 or image.size[1] == 0:
        raise InvalidArgument(name, f"{name} has no pixels ({image.size[0]}x{image.size[1]})")
    return image


def _format_name(data: bytes) -> str | None:
    """The name of a refused format, from the plugins' magic-byte checks only (nothing parsed)."""
    Image.init()
    prefix = data[:16]
    for fmt, (_, accept) in Image.OPEN.items():
        try:
            if fmt not in IMAGE_FORMATS and accept is not None and accept(prefix):
                return fmt
        except Exception:  # noqa: BLE001 - a plugin's check on odd bytes
            continue
    return None


def decode_mask(data: bytes, name: str = "mask", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A mask of any mode as greyscale; white = repaint."""
    return decode_image(data, name, max_pixels).convert("L")


def alpha_mask(data: bytes, name: str = "init_image", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGBA image's transparency as an inpaint mask: transparent = repaint (white)."""
    image = ImageOps.exif_transpose(_open(data, name, max_pixels))
    if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
        raise InvalidArgument("mask_from_alpha", f"{name} has no alpha channel to take the mask from "
                                                 f"(mode {image.mode}); send a mask image instead")
    return ImageOps.invert(image.convert("RGBA").getchannel("A"))


def resize_for_generation(image: Image.Image, native_size: int | None = None) -> Image.Image:
    """The reference's resize of image a (and its mask and control maps) before
    generation: at most 1.05 MP (or the model's native area), sides floored to multiples of 8, LANCZOS."""
    size = generation_size(*image.size, native_size)
    return image if size == image.size else image.resize(size, Image.LANCZOS)


def same_aspect_ratio(size: tuple[int, int], other: tuple[int, int]) -> bool:
    """Equal shapes up to rounding: scaled to the wider one, the heights differ by under a pixel."""
    (w, h), (ow, oh) = size, other
    return abs(w * oh - h * ow) < max(w, ow)


def fit_mask(mask: Image.Image, image_size: tuple[int, int], native_size: int | None = None) -> Image.Image:
    """The one mask rule (generator, library, CLI, ComfyUI nodes): a mask of image a's
    aspect ratio is resized to image a's size (LANCZOS), then goes through image a's resize
    rule, in the reference's order, so a mask of image a's own size stays exact; another
    aspect ratio is refused, naming both sizes as the user sent them."""
    if mask.size != tuple(image_size):
        check_mask_size(mask.size, image_size)
        mask = mask.resize(tuple(image_size), Image.LANCZOS)
    return resize_for_generation(mask, native_size)


def check_mask_size(mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    """fit_mask's refusal, for callers that check before sending."""
    if not same_aspect_ratio(mask_size, image_size):
        (mw, mh), (w, h) = mask_size, image_size
        raise InvalidArgument("mask", f"mask is {mw}x{mh} but image a is {w}x{h}: a mask needs image a's "
                                      f"aspect ratio (it is resized to {w}x{h}); send a {w}x{h} mask "
                                      "or one of the same shape")
