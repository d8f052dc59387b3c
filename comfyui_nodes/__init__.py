"""Qwen2VL-Flux nodes for ComfyUI: thin clients of the encoder and generator services.

ComfyUI finds them through the repository root's __init__.py (a clone in custom_nodes/), or
with this folder itself in custom_nodes/ (any folder name). Either way the light client must
be installed in ComfyUI's Python (the root requirements.txt: `pip install .` in the clone).
See README.md.
"""
import logging
import sys
from pathlib import Path

try:
    import qwen2vl_flux.client  # noqa: F401 - the one thing the pack needs besides ComfyUI
except ImportError as missing:
    _root = Path(__file__).resolve().parent.parent
    _source = str(_root) if (_root / "pyproject.toml").exists() else "/path/to/a/clone/of/qwen2vl-flux"
    logging.getLogger(__name__).error(
        "Qwen2VL-Flux nodes not loaded: the qwen2vl-flux client is not installed in ComfyUI's Python (%s); "
        "install it with: %s -m pip install %s", missing, sys.executable, _source)
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}
else:
    from .nodes import (Qwen2VLFluxControlMapDenoise, Qwen2VLFluxControlMaps, Qwen2VLFluxEncode,
                        Qwen2VLFluxGenerate, Qwen2VLFluxServices)

    NODE_CLASS_MAPPINGS = {
        "Qwen2VLFluxServices": Qwen2VLFluxServices,
        "Qwen2VLFluxEncode": Qwen2VLFluxEncode,
        "Qwen2VLFluxGenerate": Qwen2VLFluxGenerate,
        "Qwen2VLFluxControlMaps": Qwen2VLFluxControlMaps,
        "Qwen2VLFluxControlMapDenoise": Qwen2VLFluxControlMapDenoise,
    }

    NODE_DISPLAY_NAME_MAPPINGS = {
        "Qwen2VLFluxServices": "Qwen2VL Flux Services",
        "Qwen2VLFluxEncode": "Qwen2VL Encode",
        "Qwen2VLFluxGenerate": "Qwen2VL Flux Generate",
        "Qwen2VLFluxControlMaps": "Control Maps (Qwen2VL Flux)",
        "Qwen2VLFluxControlMapDenoise": "Control Map Denoise",
    }

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
