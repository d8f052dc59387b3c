"""Light client for the Qwen2VL-Flux encoder and generator services (no torch needed)."""
from .aio import AsyncClient
from .api import Client, ControlMaps, GenerationResult, ServiceError
from .channels import TLSFiles
from .errors import InvalidArgument
from .modes import Focus, Mode

__all__ = ["AsyncClient", "Client", "ControlMaps", "GenerationResult", "ServiceError", "TLSFiles", "InvalidArgument", "Focus", "Mode"]
