"""Cross-check our Anyline (encoder_server/control_maps.py) against controlnet_aux's AnylineDetector.

Run from the repository root on a machine where controlnet_aux's dependencies exist (torch, cv2,
scikit-image, einops, huggingface_hub; torchvision/timm only if its package __init__ is imported):

    pip install --no-deps controlnet_aux-0.0.10-py3-none-any.whl einops-0.8.2-py3-none-any.whl
    python bench/check_anyline.py [--device cuda] [--seed 7] [--resolution 1280]

It writes an MTEED.pth with the real TEED architecture and random weights from the seed, loads it
into both implementations, runs both on generated images and prints the max abs difference of the
final maps (and of the intermediate stages). Exit status 1 if any map differs by more than 1 level.
Use scikit-image < 0.26 (e.g. 0.25.2): 0.26 maps remove_small_objects' deprecated `min_size` onto
the new inclusive `max_size`, so controlnet_aux itself then also removes components of exactly
min_size voxels, unlike the scikit-image the original ran with. Checked here on the CPU with
controlnet_aux 0.0.10 and scikit-image 0.25.2: max abs diff 0 on all six images.
The project itself need not be installed: without it the script maps the repository folders onto
the qwen2vl_flux.* names it needs (checkpoints, client.errors, encoder_server.control_maps).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _import_project():
    try:
        from qwen2vl_flux.encoder_server import control_maps
        return control_maps
    except ImportError:
        pass
    # Not installed: bare packages over the repository folders (no client/__init__, which needs grpc).
    root = types.ModuleType("qwen2vl_flux")
    root.__path__ = []
    sys.modules["qwen2vl_flux"] = root
    for name, folder in (("client", "client"), ("encoder_server", "encoder_server")):
        pkg = types.ModuleType(f"qwen2vl_flux.{name}")
        pkg.__path__ = [str(REPO / folder)]
        sys.modules[pkg.__name__] = pkg
    spec = importlib.util.spec_from_file_location(
        "qwen2vl_flux.checkpoints", REPO / "checkpoints" / "__init__.py",
        submodule_search_locations=[str(REPO / "checkpoints")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    from qwen2vl_flux.encoder_server import control_maps
    return control_maps


def _import_anyline():
    """controlnet_aux.anyline.AnylineDetector; bypasses the package __init__ (which imports every
    detector and their dependencies) when that fails."""
    try:
        from controlnet_aux.anyline import AnylineDetector
        from controlnet_aux.teed.ted import TED
        return AnylineDetector, TED
    except ImportError as exc:
        spec = importlib.util.find_spec("controlnet_aux")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("controlnet_aux is not installed (pip install --no-deps the wheel)") from exc
        print(f"note: `import controlnet_aux` failed ({exc}); importing its anyline module alone")
        for key in [k for k in sys.modules if k == "controlnet_aux" or k.startswith("controlnet_aux.")]:
            del sys.modules[key]
        pkg = types.ModuleType("controlnet_aux")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["controlnet_aux"] = pkg
        from controlnet_aux.anyline import AnylineDetector
        from controlnet_aux.teed.ted import TED
        return AnylineDetector, TED


def images(seed: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []

    def add(name, h, w, kind):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        if kind == "waves":
            a = (np.sin(xx / 9.0) + np.cos(yy / 6.0)) * 60 + 128
            a = np.stack([a, np.roll(a, 17, 0), np.roll(a, 31, 1)], 2)
        elif kind == "noise":
            a = rng.integers(0, 256, (h, w, 3)).astype(np.float64)
        elif kind == "drawing":  # dark strokes and specks on paper: exercises remove_small_objects
            a = np.full((h, w, 3), 235.0)
            for i in range(0, h + w, 23):
                a[np.abs(xx + yy - i) < 1.5] = 30
            a[rng.random((h, w)) < 0.004] = 0
            a[(xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(h, w) / 5) ** 2] = (200, 40, 40)
        else:  # "photo": smooth shapes plus noise
            a = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], 2)
            a[(xx % 160 < 80) & (yy % 120 < 60)] *= 0.5
            a += rng.normal(0, 6, (h, w, 3))
        out.append((f"{name} {h}x{w}", np.clip(a, 0, 255).astype(np.uint8)))

    add("waves", 96, 128, "waves")
    add("noise", 333, 517, "noise")
    add("drawing", 768, 1024, "drawing")
    add("photo", 1024, 1024, "photo")
    add("photo", 768, 1344, "photo")
    add("drawing", 1400, 1500, "drawing")  # short side > 1280: INTER_AREA downscale path
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--resolution", type=int, default=1280)
    parser.add_argument("--weights-dir", type=Path, default=None, help="where MTEED.pth goes (default: a temp dir)")
    parser.add_argument("--tolerance", type=int, default=1, help="max abs diff allowed, in levels of 255")
    parser.add_argument("--logit-scale", type=float, default=15.0,
                        help="scale the up-blocks' last layers so random logits span the sigmoid and all three "
                             "safe_step levels (unscaled random weights give a flat 127 edge layer)")
    args = parser.parse_args()

    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True

    cm = _import_project()
    from qwen2vl_flux.checkpoints.tiny_control import tiny_teed_state
    AnylineDetector, TED = _import_anyline()
    import skimage
    from skimage import morphology

    from importlib.metadata import PackageNotFoundError, version
    try:
        aux_version = version("controlnet_aux")
    except PackageNotFoundError:
        aux_version = "? (not installed as a distribution)"
    print(f"torch {torch.__version__}, controlnet_aux {aux_version}, "
          f"scikit-image {skimage.__version__}, numpy {np.__version__}, device {args.device}")

    folder = args.weights_dir or Path(tempfile.mkdtemp(prefix="mteed-"))
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_teed_state(args.seed)
    for key in ("up_block_1.features.2", "up_block_2.features.2", "up_block_3.features.5"):
        for p in ("weight", "bias"):
            state[f"{key}.{p}"] = state[f"{key}.{p}"] * args.logit_scale
    torch.save(state, folder / "MTEED.pth")
    detector = AnylineDetector.from_pretrained(str(folder), filename="MTEED.pth").to(args.device)
    ours = cm.load_teed(folder / "MTEED.pth", args.device)
    assert set(TED().state_dict()) == set(ours.state_dict()), "state-dict keys differ"

    worst = 0
    for name, rgb in images(args.seed):
        # stage 1: TEED logits on the resized image
        resized = cm.resize_image(cm.hwc3(rgb), args.resolution)
        x = torch.from_numpy(resized.copy()).float().to(args.device).permute(2, 0, 1).unsqueeze(0)
        with torch.no_grad():
            logits = max((a - b).abs().max().item() for a, b in zip(detector.model(x), ours(x)))
        # stage 2: remove_small_objects on this image's lineart layer (skimage vs ours)
        lineart = cm.get_intensity_mask(
            cm.hwc3(cm.lineart_standard_intensity(resized, cm.ANYLINE_GAUSSIAN_SIGMA,
                                                  cm.ANYLINE_INTENSITY_THRESHOLD)), 0, 255)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference_mask = morphology.remove_small_objects(lineart.astype(bool), min_size=36, connectivity=1)
        mask_diff = int((reference_mask != cm.remove_small_objects(lineart.astype(bool), 36)).sum())
        # final maps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = np.array(detector(Image.fromarray(rgb), detect_resolution=args.resolution))
        mine = cm.anyline(ours, rgb, args.device, args.resolution)
        diff = np.abs(reference.astype(np.int32) - mine.astype(np.int32))
        worst = max(worst, int(diff.max()))
        print(f"{name:22s} final max|diff| {int(diff.max()):3d} (pixels differing {int((diff > 0).sum())}"
              f"/{diff.size}), TEED logits max|diff| {logits:.3g}, small-object mask pixels differing "
              f"{mask_diff}, levels min/mean/max {reference.min()}/{reference.mean():.1f}/{reference.max()}")
    ok = worst <= args.tolerance
    print(f"{'OK' if ok else 'FAIL'}: worst max abs diff {worst} (tolerance {args.tolerance})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
