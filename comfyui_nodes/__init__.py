"""Qwen2VL-Flux nodes for ComfyUI: thin clients of the encoder and generator services.

Install by placing this folder in ComfyUI/custom_nodes/ (any folder name) with the
light client installed in ComfyUI's environment (`pip install qwen2vl-flux`, no extras:
no torch, transformers or diffusers of its own). See README.md.
"""
from .nodes import (Qwen2VLFluxControlMapDenoise, Qwen2VLFluxControlMaps, Qwen2VLFluxEncode, Qwen2VLFluxGenerate,
                    Qwen2VLFluxServices)

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
