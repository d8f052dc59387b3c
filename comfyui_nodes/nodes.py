"""The Qwen2VL-Flux nodes: thin clients of the encoder and generator services.

No model weights live in ComfyUI: Encode sends the images to the encoder and gets
back an embedding bundle (the tensors themselves, a few MB, so any generator
replica can use it); Generate streams a generation from the generator, following
its progress events with ComfyUI's progress bar; Control Maps asks the encoder for
depth and line maps. Mode rules, defaults and checks come from the client library
(qwen2vl_flux.client.modes), so ComfyUI, the CLI and the servers agree.
"""
from __future__ import annotations

import io
import json
import os
import queue
import threading
from typing import Any

from PIL import Image, ImageFilter

from qwen2vl_flux.client import Client, Focus, Mode
from qwen2vl_flux.client.images import check_mask_size, image_bytes
from qwen2vl_flux.client.modes import (ASPECT_RATIOS, DEFAULTS, MAX_IMAGE_COUNT, MAX_STEPS, PARAMETERS_USED,
                                       ROLE_INPUT, ROLE_REFERENCE, control_maps_used, focus_role,
                                       resolve_parameters, transformer_role)
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb

from .convert import image_to_pil, image_to_pils, mask_to_pil, pils_to_image

# Custom ComfyUI types: plain strings, matched by name when links are drawn.
SERVICES = "QWEN2VL_FLUX_SERVICES"
BUNDLE = "QWEN2VL_FLUX_BUNDLE"

CATEGORY = "Qwen2VL-Flux"
CONTROL_CATEGORY = "Qwen2VL-Flux/control maps"

MODES = [m.value for m in Mode]
LINE_DETECTORS = ["auto", "anyline", "canny"]
AUTO_SIZE = "auto"   # aspect_ratio: the model's default size
TOKEN_ENV = "QWEN2VL_FLUX_TOKEN"
MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_SIZE = 8192
MAX_DENOISE_RADIUS = 100.0

# How often Generate looks at ComfyUI's interrupt flag while the stream runs, and
# how long it waits for the cancelled call to wind down before reporting the interrupt.
POLL_SECONDS = 0.05
CANCEL_WAIT_SECONDS = 10.0


# ------------------------------------------------------------------ ComfyUI's own modules

def _comfy_utils():
    import comfy.utils

    return comfy.utils


def _model_management():
    import comfy.model_management

    return comfy.model_management


def _interrupted(mm) -> bool:
    if hasattr(mm, "processing_interrupted"):
        return bool(mm.processing_interrupted())
    return bool(getattr(mm, "interrupt_processing", False))


def _raise_interrupt(mm) -> None:
    mm.throw_exception_if_processing_interrupted()
    # The flag was reset in between (another node saw it first): still an interrupt.
    raise getattr(mm, "InterruptProcessingException", RuntimeError)()


# ------------------------------------------------------------------ the two custom types

class ServicesConnection:
    """QWEN2VL_FLUX_SERVICES: where the two services are and how to reach them.

    Clients (gRPC channels) are shared by every connection with the same settings
    and opened on first use, so re-running a workflow reuses warm channels."""

    _clients: dict[tuple, Client] = {}
    _lock = threading.Lock()

    def __init__(self, encoder: str, generator: str, timeout: float = 600.0, token: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None):
        self.encoder, self.generator, self.timeout = encoder, generator, float(timeout)
        self._token = token or None
        self.tls_ca, self.tls_cert, self.tls_key = tls_ca or None, tls_cert or None, tls_key or None

    def _key(self) -> tuple:
        return (self.encoder, self.generator, self.timeout, self._token, self.tls_ca, self.tls_cert, self.tls_key)

    def client(self) -> Client:
        key = self._key()
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = Client(encoder=self.encoder, generator=self.generator, timeout=self.timeout,
                                token=self._token, tls_ca=self.tls_ca, tls_cert=self.tls_cert,
                                tls_key=self.tls_key)
                self._clients[key] = client
            return client

    def __repr__(self) -> str:  # never shows the token
        tls = "tls" if (self.tls_ca or self.tls_cert) else "plaintext"
        auth = ", token" if self._token else ""
        return f"ServicesConnection(encoder={self.encoder!r}, generator={self.generator!r}, {tls}{auth})"


class EmbeddingBundle:
    """QWEN2VL_FLUX_BUNDLE: the serialized EmbeddingBundle (tensors inside, no
    server-side handle) plus what Generate needs to check and reuse it."""

    __slots__ = ("data", "mode", "roles", "has_prompt", "image")

    def __init__(self, data: bytes, mode: str, roles: tuple[str, ...], has_prompt: bool, image: bytes):
        self.data = data            # EmbeddingBundle.SerializeToString()
        self.mode = mode            # the mode Encode embedded for
        self.roles = roles          # which images were embedded ("a", "b")
        self.has_prompt = has_prompt
        self.image = image          # image a as sent to the encoder (PNG): Generate's default image a

    def proto(self) -> pb.EmbeddingBundle:
        return pb.EmbeddingBundle.FromString(self.data)

    def __repr__(self) -> str:
        return (f"EmbeddingBundle(mode={self.mode!r}, roles={list(self.roles)}, prompt={self.has_prompt}, "
                f"{len(self.data) / 1e6:.2f} MB)")


# ------------------------------------------------------------------ nodes

class Qwen2VLFluxServices:
    DESCRIPTION = ("Where the Qwen2VL-Flux encoder and generator services listen. The models run there; "
                   "ComfyUI only sends images and receives images.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "encoder": ("STRING", {"default": "127.0.0.1:50051", "tooltip":
                            "host:port of the encoder; several replicas as a,b or a gRPC target (dns:///...)"}),
                "generator": ("STRING", {"default": "127.0.0.1:50052", "tooltip":
                              "host:port of the generator; several replicas as a,b or a gRPC target"}),
                "timeout": ("FLOAT", {"default": 600.0, "min": 1.0, "max": 86400.0, "step": 1.0,
                                      "tooltip": "deadline of each call, in seconds"}),
            },
            "optional": {
                "token": ("STRING", {"default": "", "tooltip":
                          f"bearer token; leave empty to read ${TOKEN_ENV} (a token typed here is saved in the "
                          "workflow and in the PNGs SaveImage writes)"}),
                "tls_ca": ("STRING", {"default": "", "tooltip": "PEM file verifying the servers (switches to TLS)"}),
                "tls_cert": ("STRING", {"default": "", "tooltip": "client certificate (PEM) for mutual TLS"}),
                "tls_key": ("STRING", {"default": "", "tooltip": "client key (PEM) for mutual TLS"}),
            },
        }

    RETURN_TYPES = (SERVICES,)
    RETURN_NAMES = ("services",)
    OUTPUT_TOOLTIPS = ("connection to both services, for the other Qwen2VL-Flux nodes",)
    FUNCTION = "connect"
    CATEGORY = CATEGORY

    def connect(self, encoder, generator, timeout, token="", tls_ca="", tls_cert="", tls_key=""):
        encoder, generator = encoder.strip(), generator.strip()
        if not encoder or not generator:
            raise ValueError("Qwen2VL Flux Services: both the encoder and the generator address are needed")
        token = token.strip() or os.environ.get(TOKEN_ENV, "").strip() or None
        return (ServicesConnection(encoder, generator, timeout, token, tls_ca.strip(), tls_cert.strip(),
                                   tls_key.strip()),)


class Qwen2VLFluxEncode:
    DESCRIPTION = ("Embeds image a (and the optional reference b) with Qwen2-VL and the prompt with T5 on the "
                   "encoder service. The mode decides which images are embedded and which one gets the focus "
                   "circle (image a in variation, the reference otherwise).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "services": (SERVICES,),
                "image": ("IMAGE", {"tooltip": "image a (the first of a batch)"}),
                "prompt": ("STRING", {"default": "", "multiline": True,
                                      "tooltip": "optional text; empty = image only"}),
                "mode": (MODES, {"default": Mode.VARIATION.value,
                                 "tooltip": "the mode the bundle is for (use the same in Generate)"}),
                "focus": ("BOOLEAN", {"default": False, "label_on": "on", "label_off": "off",
                                      "tooltip": "attend to a circle of the focused image"}),
                "center_x": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
                "center_y": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
                "radius": ("FLOAT", {"default": 0.3, "min": 0.01, "max": 1.0, "step": 0.01}),
            },
            "optional": {
                "reference": ("IMAGE", {"tooltip": "reference b (not read in variation)"}),
            },
        }

    RETURN_TYPES = (BUNDLE,)
    RETURN_NAMES = ("bundle",)
    OUTPUT_TOOLTIPS = ("the embeddings themselves (no server-side state)",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, services, image, prompt, mode, focus, center_x, center_y, radius, reference=None):
        mode = Mode.parse(mode)
        a = image_bytes(image_to_pil(image, "image"))
        b = image_bytes(image_to_pil(reference, "reference")) if reference is not None else None
        circle = None
        if focus:
            if focus_role(mode) == ROLE_REFERENCE and b is None:
                raise ValueError(f"Qwen2VL Encode: in mode {mode.value} the focus applies to the reference image; "
                                 "connect a reference or switch focus off")
            circle = Focus(float(center_x), float(center_y), float(radius))
        bundle = services.client().encode(a, reference=b, prompt=prompt, focus=circle, mode=mode)
        roles = tuple(item.role for item in bundle.images)
        return (EmbeddingBundle(bundle.SerializeToString(deterministic=True), mode.value, roles,
                                bundle.HasField("prompt"), a),)


class Qwen2VLFluxGenerate:
    DESCRIPTION = ("Runs FLUX on the generator service with an embedding bundle. Image a defaults to the image "
                   "the bundle was encoded from; ControlNet modes without maps get them from the encoder. "
                   "The progress bar follows the generator's steps; Cancel stops the generation on the server.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "services": (SERVICES,),
                "bundle": (BUNDLE,),
                "mode": (MODES, {"default": Mode.VARIATION.value}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED}),
                "steps": ("INT", {"default": DEFAULTS["steps"], "min": 1, "max": MAX_STEPS}),
                "guidance": ("FLOAT", {"default": DEFAULTS["guidance"], "min": 0.0, "max": 100.0, "step": 0.1}),
                "strength": ("FLOAT", {"default": DEFAULTS["strength"], "min": 0.01, "max": 1.0, "step": 0.01,
                                       "tooltip": "how much of image a is repainted (not in variation)"}),
                "image_count": ("INT", {"default": DEFAULTS["image_count"], "min": 1, "max": MAX_IMAGE_COUNT}),
                "aspect_ratio": ([AUTO_SIZE, *ASPECT_RATIOS], {
                    "default": AUTO_SIZE, "tooltip": "variation only; auto = the model's own size (128 for the demo "
                                                     "model, else 1024x1024); a ratio keeps the model's area"}),
                "width": ("INT", {"default": 0, "min": 0, "max": MAX_SIZE, "step": 16,
                                  "tooltip": "variation only; 0 with height 0 = from aspect_ratio"}),
                "height": ("INT", {"default": 0, "min": 0, "max": MAX_SIZE, "step": 16,
                                   "tooltip": "variation only; 0 with width 0 = from aspect_ratio"}),
                "depth": ("BOOLEAN", {"default": DEFAULTS["depth"], "tooltip": "ControlNet modes: use a depth map"}),
                "depth_strength": ("FLOAT", {"default": DEFAULTS["depth_strength"], "min": 0.0, "max": 10.0,
                                             "step": 0.01}),
                "line": ("BOOLEAN", {"default": DEFAULTS["line"], "tooltip": "ControlNet modes: use a line map"}),
                "line_strength": ("FLOAT", {"default": DEFAULTS["line_strength"], "min": 0.0, "max": 10.0,
                                            "step": 0.01}),
                "line_detector": (LINE_DETECTORS, {"default": "auto",
                                                   "tooltip": "for a line map the encoder computes"}),
                "corrected_controlnet": ("BOOLEAN", {"default": DEFAULTS["corrected_controlnet"]}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "image a; default: the image the bundle was encoded from"}),
                "mask": ("MASK", {"tooltip": "inpaint modes: white (1.0) = repaint"}),
                "depth_map": ("IMAGE", {"tooltip": "ready-made depth map; default: computed by the encoder"}),
                "line_map": ("IMAGE", {"tooltip": "ready-made line map; default: computed by the encoder"}),
            },
        }

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("images", "info")
    OUTPUT_TOOLTIPS = ("image_count images", "effective parameters, seed and timings (JSON)")
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    def generate(self, services, bundle, mode, seed, steps, guidance, strength, image_count, aspect_ratio,
                 width, height, depth, depth_strength, line, line_strength, line_detector, corrected_controlnet,
                 image=None, mask=None, depth_map=None, line_map=None):
        mode = Mode.parse(mode)
        _check_bundle(bundle, mode)
        if mode is Mode.VARIATION and (width == 0) != (height == 0):
            raise ValueError("Qwen2VL Flux Generate: set both width and height, or both to 0 to use aspect_ratio")
        given = dict(seed=int(seed), steps=int(steps), guidance=float(guidance), strength=float(strength),
                     image_count=int(image_count), aspect_ratio=None if aspect_ratio == AUTO_SIZE else aspect_ratio,
                     width=int(width) or None,
                     height=int(height) or None, depth=bool(depth), depth_strength=float(depth_strength),
                     line=bool(line), line_strength=float(line_strength),
                     corrected_controlnet=bool(corrected_controlnet))
        # Only what this mode reads: the widgets of other modes are not errors.
        params = {k: v for k, v in given.items() if k in PARAMETERS_USED[mode] and v is not None}
        effective, _ = resolve_parameters(mode, dict(params))  # fail before any bytes travel

        client = services.client()
        init = init_size = masked = maps = None
        if mode.uses_init_image:
            if image is not None:
                picture = image_to_pil(image, "image")
                init, init_size = image_bytes(picture), picture.size
            else:
                init = bundle.image
                with Image.open(io.BytesIO(init)) as picture:
                    init_size = picture.size
        if mode.uses_mask:
            if mask is None:
                raise ValueError(f"Qwen2VL Flux Generate: mode {mode.value} needs a MASK (white = repaint)")
            masked = mask_to_pil(mask)
            check_mask_size(masked.size, init_size)   # the generator's rule, before any bytes travel
        if mode.uses_controlnet:
            needed = [kind for kind, _, _ in control_maps_used(effective)]
            given_maps = {"depth": depth_map, "line": line_map}
            maps = {k: image_to_pil(given_maps[k], f"{k}_map").convert("RGB")
                    for k in needed if given_maps[k] is not None}
            missing = [k for k in needed if k not in maps]
            if missing:
                maps.update(client.control_maps(init, missing, line_detector=line_detector).maps)

        pbar = _comfy_utils().ProgressBar(effective["steps"])
        result = _generate_interruptible(client, pbar, bundle=bundle.proto(), mode=mode, image=init, mask=masked,
                                         control_maps=maps, output_format="raw", **params)
        info = {"mode": mode.value, "seed": result.seed, "parameters": result.parameters,
                "ignored_parameters": result.ignored_parameters, "request_id": result.request_id,
                "timings": result.timings}
        return (pils_to_image(result.images), json.dumps(info, sort_keys=True))


class Qwen2VLFluxControlMaps:
    DESCRIPTION = ("Depth (Depth Anything V2) and line (Anyline or Canny) maps of an image, computed on the "
                   "encoder service, at the size the generator will use.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "services": (SERVICES,),
                "image": ("IMAGE",),
                "line_detector": (LINE_DETECTORS, {"default": "auto",
                                                   "tooltip": "auto = Anyline when its weights are there, else Canny"}),
                "denoise_radius": ("FLOAT", {"default": 0.0, "min": 0.0, "max": MAX_DENOISE_RADIUS, "step": 0.5,
                                             "tooltip": "Gaussian blur of both maps, in pixels (0 = none)"}),
            },
        }

    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("depth", "line", "detector")
    OUTPUT_TOOLTIPS = ("depth map", "line map", "what made each map")
    FUNCTION = "compute"
    CATEGORY = CONTROL_CATEGORY

    def compute(self, services, image, line_detector, denoise_radius):
        client = services.client()
        depth, line, detectors = [], [], {}
        for picture in image_to_pils(image):
            maps = client.control_maps(picture, ("depth", "line"), line_detector=line_detector,
                                       denoise_radius=float(denoise_radius) or None)
            depth.append(maps.maps["depth"])
            line.append(maps.maps["line"])
            detectors = maps.detectors
        detector = ", ".join(f"{kind}: {name}" for kind, name in sorted(detectors.items()))
        return (pils_to_image(depth), pils_to_image(line), detector)


class Qwen2VLFluxControlMapDenoise:
    DESCRIPTION = "Gaussian blur of a control map (as the encoder's denoise_radius does), on the CPU."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "radius": ("FLOAT", {"default": 2.0, "min": 0.0, "max": MAX_DENOISE_RADIUS, "step": 0.5,
                                     "tooltip": "blur radius in pixels (0 = unchanged)"}),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)
    FUNCTION = "denoise"
    CATEGORY = CONTROL_CATEGORY

    def denoise(self, image, radius):
        if radius <= 0:
            return (image,)
        blur = ImageFilter.GaussianBlur(float(radius))
        return (pils_to_image([p.convert("RGB").filter(blur) for p in image_to_pils(image)]),)


# ------------------------------------------------------------------ helpers

def _check_bundle(bundle: EmbeddingBundle, mode: Mode) -> None:
    if not isinstance(bundle, EmbeddingBundle):
        raise TypeError(f"Qwen2VL Flux Generate: bundle must come from Qwen2VL Encode, got {type(bundle).__name__}")
    roles = set(bundle.roles)
    needed = {transformer_role(mode, roles)} | ({ROLE_INPUT} if mode.uses_controlnet else set())
    missing = sorted(needed - roles)
    if missing:
        names = {ROLE_INPUT: "image a", ROLE_REFERENCE: "the reference"}
        raise ValueError(f"Qwen2VL Flux Generate: mode {mode.value} needs the embedding of "
                         f"{', '.join(names[r] for r in missing)}, but the bundle was encoded in mode "
                         f"{bundle.mode}; set Qwen2VL Encode's mode to {mode.value}")


_DONE = object()


def _generate_interruptible(client: Client, pbar, **kwargs: Any):
    """client.generate on a worker thread; this (ComfyUI's execution) thread moves the
    progress bar and watches ComfyUI's interrupt flag. On an interrupt the call is
    cancelled through `cancel_event`, so the generator stops its denoise loop."""
    mm = _model_management()
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()
    outcome: dict[str, Any] = {}

    def work():
        try:
            outcome["result"] = client.generate(progress=events.put, cancel_event=cancel, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the execution thread
            outcome["error"] = e
        finally:
            events.put(_DONE)

    worker = threading.Thread(target=work, name="qwen2vl-flux-generate", daemon=True)
    worker.start()
    try:
        while True:
            try:
                event = events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                event = None
            if event is _DONE:
                break
            if event is not None:
                pbar.update_absolute(event.step, event.total)   # ComfyUI's hook may raise on interrupt
            if _interrupted(mm):
                _cancel(worker, cancel)
                _raise_interrupt(mm)
    except BaseException:
        if worker.is_alive():
            _cancel(worker, cancel)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _cancel(worker: threading.Thread, cancel: threading.Event) -> None:
    """Cancel the stream (Client.generate's cancel_event) and give the call a moment
    to end, so the generator has stopped its denoise loop when ComfyUI moves on."""
    cancel.set()
    worker.join(CANCEL_WAIT_SECONDS)
