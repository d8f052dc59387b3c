"""The published Qwen2VL-Flux checkpoint layout, shared by both servers.

`--checkpoints DIR` points at a directory laid out as the model is published
(Djrango/Qwen2vl-Flux); see ../shared/MODEL_NOTES.md. Both servers read every
dimension from the configs and tensor shapes found here.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

# Ours, beside the published layout (which has none): {"native_size": 128} for a model
# trained at 128x128. Absent means FLUX.1-dev's 1024 (its aspect-ratio table, 1.05 MP).
NATIVE_SIZE_FILE = "qwen2vl-flux.json"


class CheckpointError(RuntimeError):
    """The checkpoint directory is missing a part, or a part has the wrong shape."""


@dataclass(frozen=True)
class CheckpointLayout:
    root: Path

    @property
    def flux(self) -> Path:
        return self.root / "flux"

    @property
    def transformer(self) -> Path:
        return self.flux / "transformer"

    @property
    def vae(self) -> Path:
        return self.flux / "vae"

    @property
    def scheduler(self) -> Path:
        return self.flux / "scheduler"

    @property
    def clip_tokenizer(self) -> Path:
        return self.flux / "tokenizer"

    @property
    def clip(self) -> Path:
        return self.flux / "text_encoder"

    @property
    def t5_tokenizer(self) -> Path:
        return self.flux / "tokenizer_2"

    @property
    def t5(self) -> Path:
        return self.flux / "text_encoder_2"

    @property
    def qwen(self) -> Path:
        return self.root / "qwen2-vl"

    @property
    def connector(self) -> Path:
        return self.qwen / "connector.pt"

    @property
    def t5_embedder(self) -> Path:
        return self.qwen / "t5_embedder.pt"

    @property
    def controlnet(self) -> Path:
        return self.root / "controlnet"

    @property
    def depth_anything(self) -> Path:
        return self.root / "depth-anything-v2"

    @property
    def anyline(self) -> Path:
        return self.root / "anyline" / "MTEED.pth"

    @property
    def native_size(self) -> int | None:
        """The side the model was trained at, if the checkpoint declares one."""
        path = self.root / NATIVE_SIZE_FILE
        if not path.exists():
            return None
        try:
            value = json.loads(path.read_text()).get("native_size")
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{path} is not a JSON object: {e}") from None
        if value is None:
            return None
        if not isinstance(value, int) or value <= 0 or value % 16:
            raise CheckpointError(f"{path}: native_size must be a positive multiple of 16, got {value!r}")
        return value

    def require(self, *paths: Path) -> None:
        missing = [str(p.relative_to(self.root)) for p in paths if not p.exists()]
        if missing:
            raise CheckpointError(
                f"checkpoint directory {self.root} lacks {', '.join(missing)}; "
                "point --checkpoints at the published Qwen2VL-Flux layout "
                "(or run `qwen2vl-flux make-tiny-checkpoints DIR` for the tiny preset)"
            )

    def checkpoint_id(self) -> str:
        """Digest of the two projections that define the embedding space.

        connector.pt and t5_embedder.pt decide what the encoder's tensors mean
        to FLUX, and both servers can read them cheaply, so equal digests mean a
        bundle from this encoder is valid input for this generator.
        """
        self.require(self.connector, self.t5_embedder)
        digest = hashlib.sha256()
        for path in (self.connector, self.t5_embedder):
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
        return digest.hexdigest()[:16]
