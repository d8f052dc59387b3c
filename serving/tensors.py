"""torch tensors <-> v1 `Tensor` messages: raw little-endian bytes, dtype, shape."""
from __future__ import annotations

import sys

import torch

from qwen2vl_flux.client.wire import check_tensor
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb

_TO_WIRE = {
    torch.float32: pb.FLOAT32, torch.float16: pb.FLOAT16, torch.bfloat16: pb.BFLOAT16,
    torch.int64: pb.INT64, torch.int32: pb.INT32, torch.uint8: pb.UINT8, torch.bool: pb.BOOL,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}
# numpy has no bfloat16: move those bytes as int16 of the same width.
_BYTE_VIEW = {torch.bfloat16: torch.int16}

assert sys.byteorder == "little", "the wire format is little-endian; big-endian hosts need byte swaps"


def to_wire(tensor: torch.Tensor) -> pb.Tensor:
    t = tensor.detach().to("cpu").contiguous()
    view = t.view(_BYTE_VIEW.get(t.dtype, t.dtype))
    return pb.Tensor(dtype=_TO_WIRE[t.dtype], shape=list(t.shape), data=view.numpy().tobytes())


def from_wire(message: pb.Tensor, name: str) -> torch.Tensor:
    """Checks byte length against dtype x shape first: a bad tensor is the caller's error."""
    check_tensor(message, name)
    dtype = _FROM_WIRE[message.dtype]
    if not message.data:
        return torch.empty(list(message.shape), dtype=dtype)
    flat = torch.frombuffer(bytearray(message.data), dtype=_BYTE_VIEW.get(dtype, dtype))
    return flat.view(dtype).reshape(list(message.shape))
