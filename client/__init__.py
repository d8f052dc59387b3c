"""Light client for the Qwen2VL-Flux encoder and generator services (no torch needed)."""
from .api import Client, GenerationResult, ServiceError
from .errors import InvalidArgument
from .modes import Focus, Mode

__all__ = ["Client", "GenerationResult", "ServiceError", "InvalidArgument", "Focus", "Mode"]
