"""OpenAI-compatible HTTP gateway: the OpenAI Images API's variations and edits
endpoints served by the two Qwen2VL-Flux services (no model, no torch here)."""
from .app import MODEL_NAME, Settings, create_app

__all__ = ["MODEL_NAME", "Settings", "create_app"]
