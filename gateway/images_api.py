"""The OpenAI Images API's fields, read into one Qwen2VL-Flux generation.

What OpenAI names (`n`, `size`, `mask`, `response_format`, ...) maps onto our modes and
parameters here; the rules themselves (sizes, defaults, limits) stay in client/modes.py
and are only called from here.
"""
from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field

from PIL import Image

from qwen2vl_flux.client import Focus, InvalidArgument, Mode
from qwen2vl_flux.client.images import alpha_mask, decode_image, decode_mask, image_bytes
from qwen2vl_flux.client.modes import ASPECT_RATIOS, generation_size, output_size, resolve_parameters

# OpenAI's size names. Variations make exactly these; an edit runs at most at the
# model's 1.05 MP (its resize rule), so the two large ones map to that shape's size.
OPENAI_SIZES = {"256x256": (256, 256), "512x512": (512, 512), "1024x1024": (1024, 1024),
                "1536x1024": (1536, 1024), "1024x1536": (1024, 1536)}
OUTPUT_FORMATS = {"png": "png", "webp": "webp", "jpeg": "jpeg", "jpg": "jpeg"}
RESPONSE_FORMATS = ("b64_json", "url")
MAX_PARTIAL_IMAGES = 3
EDIT_MODES = (Mode.IMG2IMG, Mode.INPAINT, Mode.CONTROLNET, Mode.CONTROLNET_INPAINT)

# OpenAI fields that mean nothing to this model: accepted, reported back as ignored.
IGNORED_OPENAI_FIELDS = {"quality", "style", "input_fidelity", "moderation", "output_compression",
                         "safety_identifier"}
# Our own parameters (the SDK sends them from `extra_body`), with their types.
OUR_FIELDS = {"seed": int, "steps": int, "guidance": float, "strength": float, "aspect_ratio": str,
              "depth": bool, "line": bool, "depth_strength": float, "line_strength": float,
              "corrected_controlnet": bool}
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


@dataclass
class Form:
    """A parsed multipart body: text fields (last value wins) and file parts by name."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[bytes]] = field(default_factory=dict)


@dataclass
class Job:
    """One generation as the HTTP request asked for it."""

    mode: Mode
    image: bytes
    reference: bytes | None = None
    mask: bytes | None = None
    prompt: str = ""
    focus: Focus | None = None
    params: dict = field(default_factory=dict)
    line_detector: str = "auto"
    output_format: str = "png"
    response_format: str = "b64_json"
    stream: bool = False
    partial_images: int = 0
    mask_semantics: str | None = None     # "alpha", "luminance" or "image_alpha" (the image's transparency)
    ignored: list[str] = field(default_factory=list)
    user: str = ""

    @property
    def preview_every(self) -> int:
        """Steps between previews so that about `partial_images` arrive, spread over the run."""
        if not self.partial_images:
            return 0
        return max(1, math.ceil(self.params["steps"] / (self.partial_images + 1)))


def _known(form: Form, names: set[str], files: tuple[str, ...]) -> None:
    allowed = names | set(OUR_FIELDS) | IGNORED_OPENAI_FIELDS | {
        "model", "user", "response_format", "n", "size", "mode", "prompt", "output_format", "background", "focus",
        "line_detector"}
    for name in form.fields:
        base = name.split("[", 1)[0]
        if base not in allowed:
            raise InvalidArgument(name, f"unknown field {name!r}; this endpoint takes {', '.join(sorted(allowed))}")
    for name in form.files:
        if name not in files:
            raise InvalidArgument(name, f"unexpected file field {name!r}; this endpoint takes {', '.join(files)}")


def _typed(name: str, value: str, kind):
    try:
        if kind is bool:
            lowered = value.strip().lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return lowered in ("true", "1")
        if kind is int:
            return int(value)
        if kind is float:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise InvalidArgument(name, f"{name} must be {expected}, got {value!r}") from None
    return value


def _our_params(form: Form) -> dict:
    return {name: _typed(name, form.fields[name], kind) for name, kind in OUR_FIELDS.items() if name in form.fields}


def _focus(form: Form) -> Focus | None:
    """`focus` as "x,y,radius", or focus[center_x] / focus[center_y] / focus[radius] (what
    the SDK makes of `extra_body={"focus": {...}}`)."""
    parts = {key: form.fields.get(f"focus[{key}]") for key in ("center_x", "center_y", "radius")}
    if "focus" in form.fields:
        values = [v.strip() for v in form.fields["focus"].split(",")]
        if len(values) != 3:
            raise InvalidArgument("focus", f"focus must be 'center_x,center_y,radius', got {form.fields['focus']!r}")
        parts = dict(zip(("center_x", "center_y", "radius"), values))
    given = {k: (_typed("focus", v, float) if v is not None else None) for k, v in parts.items()}
    return Focus.from_parts(given["center_x"], given["center_y"], given["radius"])


def _check_model(form: Form, names: tuple[str, ...]) -> None:
    model = form.fields.get("model", "").strip()
    if model and model not in names:
        raise InvalidArgument("model", f"model {model!r} is not served here; this gateway serves {names[0]!r} "
                                       "(Qwen2VL-Flux; GET /v1/models lists it)")


def _common(form: Form, model_names: tuple[str, ...]) -> dict:
    _check_model(form, model_names)
    response_format = form.fields.get("response_format", "b64_json") or "b64_json"
    if response_format not in RESPONSE_FORMATS:
        raise InvalidArgument("response_format", f"response_format must be b64_json or url (answered as a data: "
                                                 f"URL), got {response_format!r}")
    output_format = form.fields.get("output_format", "png") or "png"
    if output_format.lower() not in OUTPUT_FORMATS:
        raise InvalidArgument("output_format", f"output_format must be png, webp or jpeg, got {output_format!r}")
    if form.fields.get("background", "auto") == "transparent":
        raise InvalidArgument("background", "background=transparent is not possible: this model paints opaque "
                                            "images; use auto or opaque")
    count = _typed("n", form.fields["n"], int) if form.fields.get("n") else 1
    ignored = sorted(IGNORED_OPENAI_FIELDS & set(form.fields))
    return dict(response_format=response_format, output_format=OUTPUT_FORMATS[output_format.lower()],
                count=count, ignored=ignored, user=form.fields.get("user", ""))


def _one_image(form: Form, name: str, allow_two: bool) -> list[bytes]:
    images = form.files.get("image", []) + form.files.get("image[]", [])
    if not images:
        raise InvalidArgument("image", "image is required: send the input picture as the multipart file 'image'")
    limit = 2 if allow_two else 1
    if len(images) > limit:
        raise InvalidArgument("image", f"{name} takes {'one image, or two (image[]: the input, then the reference)' if allow_two else 'one image'}; "
                                       f"got {len(images)}")
    return images


def _parse_size(value: str) -> tuple[int, int] | None:
    """None for auto; (w, h) for a name or WxH with sides multiple of 16."""
    if value in ("", "auto"):
        return None
    if value in OPENAI_SIZES:
        return OPENAI_SIZES[value]
    match = _SIZE.match(value)
    if not match:
        raise InvalidArgument("size", f"size must be auto, one of {', '.join(OPENAI_SIZES)}, or WxH with both "
                                      f"sides multiples of 16; got {value!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise InvalidArgument("size", f"size {value}: this model makes sides that are positive multiples of 16 "
                                      f"(e.g. {max(16, width - width % 16)}x{max(16, height - height % 16)})")
    return width, height


def _nearest_aspect_ratio(width: int, height: int) -> str:
    shape = math.log(width / height)
    return min(ASPECT_RATIOS, key=lambda name: abs(math.log(ASPECT_RATIOS[name][0] / ASPECT_RATIOS[name][1]) - shape))


def _validated(job: Job) -> Job:
    """The mode's rules (modes.py), before any work; the seed is chosen here so every answer names it."""
    if job.params.get("seed") is None:
        job.params["seed"] = secrets.randbelow(2**32)
    effective, _ = resolve_parameters(job.mode, dict(job.params))
    job.params["steps"] = effective["steps"]
    return job


def variation_job(form: Form, model_names: tuple[str, ...], max_pixels: int) -> Job:
    """POST /v1/images/variations: image -> variations of it."""
    _known(form, {"stream"}, ("image",))
    common = _common(form, model_names)
    if form.fields.get("stream", "false").lower() not in ("false", "0", ""):
        raise InvalidArgument("stream", "variations do not stream (as in the OpenAI API); use /v1/images/edits "
                                        "with stream=true for partial images")
    if form.fields.get("mode", "variation") != "variation":
        raise InvalidArgument("mode", "this endpoint runs the variation mode; other modes are /v1/images/edits")
    (data,) = _one_image(form, "variations", allow_two=False)
    image = decode_image(data, "image", max_pixels)
    params = dict(_our_params(form), image_count=common["count"])
    size = _parse_size(form.fields.get("size", "auto"))
    if size is not None:
        if "aspect_ratio" in params:
            raise InvalidArgument("size", "give size or aspect_ratio, not both")
        params["width"], params["height"] = size
    elif "aspect_ratio" not in params:
        params["aspect_ratio"] = _nearest_aspect_ratio(*image.size)
    return _validated(Job(Mode.VARIATION, data, prompt=form.fields.get("prompt", ""), focus=_focus(form),
                          params=params, output_format=common["output_format"],
                          response_format=common["response_format"], ignored=common["ignored"], user=common["user"]))


def _mask(form: Form, image_data: bytes, image: Image.Image, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """The repaint mask as white = edit, and which convention the upload used: a mask
    with transparent pixels is read as OpenAI's (transparent = edit), one without as
    black/white (white = edit); with no mask, the image's own transparency if any."""
    masks = form.files.get("mask", [])
    if len(masks) > 1:
        raise InvalidArgument("mask", f"one mask, got {len(masks)}")
    if masks:
        data = masks[0]
        decoded = decode_mask(data, "mask", max_pixels)
        mask, semantics = decoded, "luminance"
        if _has_transparency(data, max_pixels):
            mask, semantics = alpha_mask(data, "mask", max_pixels), "alpha"
        if mask.size != image.size:
            raise InvalidArgument("mask", f"mask is {mask.size[0]}x{mask.size[1]} but image is "
                                          f"{image.size[0]}x{image.size[1]}; they must match")
        return mask, semantics
    if _has_transparency(image_data, max_pixels):
        return alpha_mask(image_data, "image", max_pixels), "image_alpha"
    return None, None


def _has_transparency(data: bytes, max_pixels: int) -> bool:
    try:
        return alpha_mask(data, "image", max_pixels).getextrema()[1] > 0
    except InvalidArgument as error:
        if error.parameter == "mask_from_alpha":   # no alpha channel at all
            return False
        raise


def edit_job(form: Form, model_names: tuple[str, ...], max_pixels: int) -> Job:
    """POST /v1/images/edits: image (+ reference), optional mask, prompt -> inpaint or img2img."""
    _known(form, {"stream", "partial_images"}, ("image", "image[]", "mask"))
    common = _common(form, model_names)
    images = _one_image(form, "edits", allow_two=True)
    data = images[0]
    reference = images[1] if len(images) > 1 else None
    image = decode_image(data, "image", max_pixels)
    if reference is not None:
        decode_image(reference, "image", max_pixels)
    mask, semantics = _mask(form, data, image, max_pixels)

    mode = Mode.INPAINT if mask is not None else Mode.IMG2IMG
    if form.fields.get("mode"):
        mode = Mode.parse(form.fields["mode"])
        if mode is Mode.VARIATION:
            raise InvalidArgument("mode", "variation is /v1/images/variations; edits run img2img, inpaint, "
                                          "controlnet or controlnet-inpaint")
        if mode.uses_mask and mask is None:
            raise InvalidArgument("mask", f"mode {mode.value} needs a mask: send 'mask' (transparent = edit, or "
                                          "white = edit without transparency) or an image with transparent pixels")
        if not mode.uses_mask and semantics in ("alpha", "luminance"):
            raise InvalidArgument("mask", f"mode {mode.value} takes no mask; use inpaint or controlnet-inpaint")
    if not mode.uses_mask:
        mask, semantics = None, None

    stream = _typed("stream", form.fields.get("stream", "false") or "false", bool)
    partial = _typed("partial_images", form.fields.get("partial_images", "0") or "0", int)
    if not 0 <= partial <= MAX_PARTIAL_IMAGES:
        raise InvalidArgument("partial_images", f"partial_images must be 0..{MAX_PARTIAL_IMAGES}, got {partial}")
    if partial and not stream:
        raise InvalidArgument("partial_images", "partial_images needs stream=true")

    params = dict(_our_params(form), image_count=common["count"])
    if "aspect_ratio" in params:
        raise InvalidArgument("aspect_ratio", "aspect_ratio is for variations; an edit takes its shape from the "
                                              "image (or from size)")
    target = _edit_size(form.fields.get("size", "auto"), image.size)
    send = data
    if target is not None and target != image.size:
        image = image.resize(target, Image.LANCZOS)
        send = image_bytes(image)
        if mask is not None:
            mask = mask.resize(target, Image.LANCZOS)
    return _validated(Job(mode, send, reference=reference, mask=image_bytes(mask) if mask is not None else None,
                          prompt=form.fields.get("prompt", ""), focus=_focus(form), params=params,
                          line_detector=form.fields.get("line_detector", "auto"), output_format=common["output_format"], response_format=common["response_format"],
                          stream=stream, partial_images=partial, mask_semantics=semantics,
                          ignored=common["ignored"], user=common["user"]))


def _edit_size(value: str, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """The size image a is resized to, so the output has it; None keeps the image's own."""
    size = _parse_size(value)
    if size is None:
        return None
    largest = output_size(*generation_size(*size))
    if largest == size:
        return size
    if value in OPENAI_SIZES:
        return largest      # 1536x1024 -> 1248x832: that shape at the model's 1.05 MP
    raise InvalidArgument("size", f"size {value} is above the 1.05 MP an edit runs at (the model's resize rule); "
                                  f"at this shape ask for {largest[0]}x{largest[1]} or less")

