"""connector.pt and t5_embedder.pt: the two Linear layers of Qwen2VL-Flux saved as
plain state dicts (the connector sometimes with a DataParallel `module.` prefix)."""
from __future__ import annotations

from pathlib import Path

import torch

from . import CheckpointError


def load_linear(path: Path, expect_in: int | None = None) -> torch.nn.Linear:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module.").removeprefix("linear."): v for k, v in state.items()}
    if set(state) != {"weight", "bias"}:
        raise CheckpointError(f"{path}: expected a Linear state dict (weight, bias), found keys {sorted(state)}")
    out_features, in_features = state["weight"].shape
    if expect_in is not None and in_features != expect_in:
        raise CheckpointError(f"{path}: takes {in_features} features, but the model feeding it gives {expect_in}")
    layer = torch.nn.Linear(in_features, out_features)
    layer.load_state_dict(state)
    return layer
