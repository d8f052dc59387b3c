"""The mode rules of Qwen2VL-Flux, in one place for the client, both servers and UIs.

Which image is encoded with which focus, which embedding feeds the transformer
and which the ControlNet, the output size rules, defaults and parameter checks
all follow the reference model (../shared/MODEL_NOTES.md). Torch-free on purpose.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum

from .errors import InvalidArgument


class Mode(str, Enum):
    VARIATION = "variation"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    CONTROLNET = "controlnet"
    CONTROLNET_INPAINT = "controlnet-inpaint"

    @classmethod
    def parse(cls, value: "Mode | str") -> "Mode":
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise InvalidArgument("mode", f"unknown mode {value!r}; expected one of {names}") from None

    @property
    def uses_init_image(self) -> bool:
        return self is not Mode.VARIATION

    @property
    def uses_mask(self) -> bool:
        return self in (Mode.INPAINT, Mode.CONTROLNET_INPAINT)

    @property
    def uses_controlnet(self) -> bool:
        return self in (Mode.CONTROLNET, Mode.CONTROLNET_INPAINT)


# Input roles: "a" is the image the mode works on, "b" the optional reference.
ROLE_INPUT = "a"
ROLE_REFERENCE = "b"

# FLUX.1-dev's sizes. A checkpoint trained at another size declares it (its
# `native_size`, checkpoints.NATIVE_SIZE_FILE); the table then keeps its shapes at that area.
REFERENCE_NATIVE_SIZE = 1024
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "9:16": (768, 1344),
    "2.4:1": (1536, 640),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
}

DEFAULTS: dict[str, object] = {
    "steps": 28,
    "guidance": 3.5,
    "strength": 0.8,
    "image_count": 1,
    "aspect_ratio": "1:1",
    "depth": True,
    "line": True,
    "depth_strength": 0.2,
    "line_strength": 0.4,
    "corrected_controlnet": False,
}

# T5 prompt tokens: padded to this length, all of them conditioning (reference).
T5_MAX_LENGTH = 256
MAX_STEPS = 200
MAX_IMAGE_COUNT = 16
# Request limits, checked by the client and again by the servers before any work
# (GetInfo reports them). T5 reads 256 tokens, a few KB of text at most: nothing
# past the prompt cap can change the image.
MAX_PROMPT_BYTES = 16 * 1024
MAX_REQUEST_ID_LENGTH = 128
REQUEST_ID_CHARACTERS = "A-Za-z0-9._:-"
_REQUEST_ID = re.compile(f"[{REQUEST_ID_CHARACTERS}]*")
MAX_GUIDANCE = 100.0
# Output budget of one request: all its images together, and those pixels times steps
# (16 images of 1024x1024 at 50 steps, or 4 of them at 200).
MAX_OUTPUT_PIXELS = 16 * 1024 * 1024
MAX_PIXEL_STEPS = MAX_OUTPUT_PIXELS * 50
MAX_SIDE = 4096
# The generator works on 16-pixel cells (VAE 8x, then 2x2 packing).
MIN_IMAGE_SIDE = 16
MAX_CONTROL_MAPS = 2
# Qwen2-VL refuses images beyond this aspect ratio; the control-map detectors work at a
# fixed short side (518 and 1280 px), so their cost grows with the ratio: tighter there.
MAX_ASPECT_RATIO = 200
MAX_CONTROL_MAP_ASPECT_RATIO = 8
# Qwen2-VL pixel budget (min = max pixels): the reference halves it when a prompt
# adds 256 T5 tokens.
PIXEL_BUDGET_WITH_PROMPT = 256 * 28 * 28
PIXEL_BUDGET_WITHOUT_PROMPT = 512 * 28 * 28
# Images larger than this are scaled down before generation (reference rule).
MAX_GENERATION_AREA = 1_050_000
# Control map union modes of the ControlNet, and the reference's order of maps.
CONTROL_MODE_LINE = 0
CONTROL_MODE_DEPTH = 2

_COMMON = {"seed", "steps", "guidance", "image_count"}
PARAMETERS_USED: dict[Mode, set[str]] = {
    Mode.VARIATION: _COMMON | {"aspect_ratio", "width", "height"},
    Mode.IMG2IMG: _COMMON | {"strength"},
    Mode.INPAINT: _COMMON | {"strength"},
    Mode.CONTROLNET: _COMMON | {"strength", "depth", "line", "depth_strength", "line_strength",
                                "corrected_controlnet"},
    Mode.CONTROLNET_INPAINT: _COMMON | {"strength", "depth", "line", "depth_strength",
                                        "line_strength", "corrected_controlnet"},
}
ALL_PARAMETERS = set().union(*PARAMETERS_USED.values())


def check_prompt(prompt: str) -> None:
    size = len(prompt.encode("utf-8", "surrogatepass"))
    if size > MAX_PROMPT_BYTES:
        raise InvalidArgument("prompt", f"prompt is {size} bytes of UTF-8; at most {MAX_PROMPT_BYTES} are accepted "
                                        f"(T5 reads its first {T5_MAX_LENGTH} tokens only)")


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_LENGTH or not _REQUEST_ID.fullmatch(request_id):
        shown = request_id[:32] + ("..." if len(request_id) > 32 else "")
        raise InvalidArgument("request_id", f"request_id {shown!r} ({len(request_id)} characters) must be at most "
                                            f"{MAX_REQUEST_ID_LENGTH} characters of [{REQUEST_ID_CHARACTERS}]")


def steps_run(steps: int, strength: float = 1.0) -> int:
    """Denoise steps left after the strength shortens the schedule (reference rule)."""
    return steps - int(steps - min(steps * strength, steps))


def check_aspect_ratio(name: str, width: int, height: int, limit: float = MAX_ASPECT_RATIO) -> None:
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > limit:
        raise InvalidArgument(name, f"{name} is {width}x{height}, an aspect ratio of {ratio:.0f}; at most "
                                    f"{limit:g} is accepted here (crop it)")


def check_output_budget(width: int, height: int, params: dict) -> None:
    """One request's output: all its images together, and those pixels times steps."""
    count, steps = params["image_count"], params["steps"]
    pixels = width * height * count
    if pixels > MAX_OUTPUT_PIXELS:
        raise InvalidArgument("image_count", f"image_count: {count} images of {width}x{height} are {pixels} pixels; "
                                             f"one request makes at most {MAX_OUTPUT_PIXELS} (fewer or smaller images)")
    if pixels * steps > MAX_PIXEL_STEPS:
        raise InvalidArgument("steps", f"steps: {count} images of {width}x{height} at {steps} steps exceed the "
                                       f"budget of {MAX_PIXEL_STEPS} pixel-steps per request (fewer steps or images)")


def pixel_budget(prompt: str) -> int:
    return PIXEL_BUDGET_WITH_PROMPT if prompt.strip() else PIXEL_BUDGET_WITHOUT_PROMPT


@dataclass(frozen=True)
class Focus:
    """Focus circle in relative coordinates: centre in [0, 1], radius in (0, 1]."""

    center_x: float
    center_y: float
    radius: float

    def __post_init__(self):
        for name in ("center_x", "center_y", "radius"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
                raise InvalidArgument(name, f"{name} must be a number within [0, 1], got {value!r}")
        if self.radius <= 0.0:
            raise InvalidArgument("radius", f"radius must be > 0, got {self.radius}")

    @classmethod
    def from_parts(cls, center_x, center_y, radius) -> "Focus | None":
        """All three or none: a partial focus is a mistake worth reporting."""
        given = {"center_x": center_x, "center_y": center_y, "radius": radius}
        if all(v is None for v in given.values()):
            return None
        missing = [k for k, v in given.items() if v is None]
        if missing:
            raise InvalidArgument(missing[0], f"focus needs center_x, center_y and radius together; "
                                              f"missing {', '.join(missing)}")
        return cls(float(center_x), float(center_y), float(radius))


def focus_role(mode: Mode) -> str:
    """The image a focus applies to: image a in variation, the reference b otherwise."""
    return ROLE_INPUT if mode is Mode.VARIATION else ROLE_REFERENCE


def embedding_roles(mode: Mode, has_reference: bool) -> list[str]:
    """The images the encoder must embed for a mode: only those something reads."""
    if mode is Mode.VARIATION or not has_reference:
        return [ROLE_INPUT]
    if mode.uses_controlnet:
        return [ROLE_INPUT, ROLE_REFERENCE]   # the ControlNet always reads image a
    return [ROLE_REFERENCE]


def transformer_role(mode: Mode, roles: set[str]) -> str:
    """Which image embedding conditions the FLUX transformer: b when given (not in variation)."""
    if mode is not Mode.VARIATION and ROLE_REFERENCE in roles:
        return ROLE_REFERENCE
    return ROLE_INPUT


def control_maps_used(params: dict) -> list[tuple[str, int, float]]:
    """(kind, union mode, scale) in the reference's order: depth, then line. With
    neither asked for, both are used at the reference's fixed strengths."""
    if not params["depth"] and not params["line"]:
        return [("depth", CONTROL_MODE_DEPTH, DEFAULTS["depth_strength"]),
                ("line", CONTROL_MODE_LINE, DEFAULTS["line_strength"])]
    maps = []
    if params["depth"]:
        maps.append(("depth", CONTROL_MODE_DEPTH, params["depth_strength"]))
    if params["line"]:
        maps.append(("line", CONTROL_MODE_LINE, params["line_strength"]))
    return maps


def max_generation_area(native_size: int | None = None) -> int:
    """Most pixels image a keeps before generation: the reference's 1.05 MP, or the
    declared native area (native_size squared) of a model trained at another size."""
    return MAX_GENERATION_AREA if native_size is None else native_size * native_size


def generation_size(width: int, height: int, native_size: int | None = None) -> tuple[int, int]:
    """Size an input image is resized to before generation (non-variation modes):
    scaled to at most the model's area (1.05 MP undeclared), each side floored to a multiple of 8."""
    area, limit = width * height, max_generation_area(native_size)
    if area > limit:
        scale = math.sqrt(limit / area)
        width, height = int(width * scale), int(height * scale)
    return width - width % 8, height - height % 8


def output_size(width: int, height: int) -> tuple[int, int]:
    """What the pipeline makes of a generation size: each side floored to 16."""
    return width - width % 16, height - height % 16


def aspect_ratio_size(ratio: str, native_size: int | None = None) -> tuple[int, int]:
    """The table's size for `ratio`, scaled to the model's native size (sides rounded to
    multiples of 16, at least 16); the table itself when nothing is declared."""
    width, height = ASPECT_RATIOS[ratio]
    if native_size is None or native_size == REFERENCE_NATIVE_SIZE:
        return width, height
    scale = native_size / REFERENCE_NATIVE_SIZE
    return tuple(max(16, 16 * round(side * scale / 16)) for side in (width, height))


def variation_size(params: dict, native_size: int | None = None) -> tuple[int, int]:
    if params.get("width") is not None or params.get("height") is not None:
        return int(params["width"]), int(params["height"])
    return aspect_ratio_size(params["aspect_ratio"], native_size)


def resolve_parameters(mode: Mode, given: dict, max_pixels: int | None = None) -> tuple[dict, list[str]]:
    """Validate what the caller set and fill in the defaults.

    Returns the effective parameters of this mode and the names of parameters the
    caller set that this mode does not use (UIs send every widget: accepted, reported).
    """
    unknown = set(given) - ALL_PARAMETERS
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidArgument(name, f"unknown parameter {name!r}")
    used = PARAMETERS_USED[mode]
    ignored = sorted(k for k, v in given.items() if v is not None and k not in used)
    params = {k: DEFAULTS[k] for k in used if k in DEFAULTS}
    params.update({k: v for k, v in given.items() if v is not None and k in used})

    steps = params["steps"]
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InvalidArgument("steps", f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}")
    guidance = params["guidance"]
    if not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise InvalidArgument("guidance", f"guidance must be in 0..{MAX_GUIDANCE:g}, got {guidance!r}")
    count = params["image_count"]
    if not isinstance(count, int) or not 1 <= count <= MAX_IMAGE_COUNT:
        raise InvalidArgument("image_count",
                              f"image_count must be an integer in 1..{MAX_IMAGE_COUNT}, got {count!r}")
    if "strength" in params:
        s = params["strength"]
        if not math.isfinite(s) or not 0.0 < s <= 1.0:
            raise InvalidArgument("strength", f"strength must be in (0, 1], got {s!r}")
        if steps_run(steps, s) < 1:
            raise InvalidArgument("strength", f"strength {s!r} leaves no denoise step of {steps} "
                                              f"(steps x strength must reach 1); raise strength or steps")
    for name in ("depth_strength", "line_strength"):
        if name in params and (not math.isfinite(params[name]) or params[name] < 0):
            raise InvalidArgument(name, f"{name} must be >= 0, got {params[name]!r}")
    if "seed" in params and not 0 <= int(params["seed"]) < 2**64:
        raise InvalidArgument("seed", f"seed must be in 0..2**64-1, got {params['seed']!r}")

    if mode is Mode.VARIATION:
        _check_variation_size(params, max_pixels)
        check_output_budget(*variation_size(params), params)
    if mode.uses_controlnet and not params["depth"] and not params["line"]:
        # Neither map asked for: the reference uses both at fixed strengths.
        ignored = sorted(set(ignored) | {k for k in ("depth_strength", "line_strength") if given.get(k) is not None})
    return params, ignored


def _check_variation_size(params: dict, max_pixels: int | None) -> None:
    ratio = params["aspect_ratio"]
    if ratio not in ASPECT_RATIOS:
        raise InvalidArgument("aspect_ratio", f"unknown aspect_ratio {ratio!r}; expected one of "
                                              f"{', '.join(ASPECT_RATIOS)}")
    width, height = params.get("width"), params.get("height")
    if (width is None) != (height is None):
        raise InvalidArgument("width" if width is None else "height",
                              "width and height go together (or leave both unset for aspect_ratio)")
    if width is None:
        return
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % 16 or value > MAX_SIDE:
            raise InvalidArgument(name, f"{name} must be a positive multiple of 16 up to {MAX_SIDE}, got {value}")
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidArgument("width", f"{width}x{height} exceeds this server's limit of "
                                       f"{max_pixels} pixels")
