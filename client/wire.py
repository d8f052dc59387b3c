"""Wire-format helpers that need no torch: tensor checks and padding, parameter
and mode conversion between Python values and the v1 protobuf messages."""
from __future__ import annotations

import math

from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb

from .errors import InvalidArgument
from .modes import ALL_PARAMETERS, Mode

API_VERSION = "qwen2vl_flux.v1"
# gRPC's default 4 MiB is too small: a 1024x1024 PNG plus a bundle is several MB,
# and a batch of 16 output images far more (they stream one per message).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Default wire bucket for image token sequences.
TOKEN_BUCKET = 64

# Even an empty tensor may not claim an absurd shape (torch cannot allocate its strides).
MAX_TENSOR_RANK = 8
MAX_TENSOR_DIM = 2**31 - 1

ITEMSIZE = {
    pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.INT64: 8,
    pb.INT32: 4, pb.UINT8: 1, pb.BOOL: 1,
}

_MODES = {
    Mode.VARIATION: pb.VARIATION, Mode.IMG2IMG: pb.IMG2IMG, Mode.INPAINT: pb.INPAINT,
    Mode.CONTROLNET: pb.CONTROLNET, Mode.CONTROLNET_INPAINT: pb.CONTROLNET_INPAINT,
}
_MODES_BACK = {v: k for k, v in _MODES.items()}


def mode_to_proto(mode: Mode | str) -> int:
    return _MODES[Mode.parse(mode)]


def mode_from_proto(value: int) -> Mode:
    if value not in _MODES_BACK:
        raise InvalidArgument("mode", f"unknown mode {value}; expected one of "
                                      f"{', '.join(f'{v} ({k.value})' for k, v in _MODES.items())}")
    return _MODES_BACK[value]


def check_tensor(tensor: pb.Tensor, name: str) -> None:
    """Reject tensors whose bytes cannot be what dtype and shape say."""
    if tensor.dtype not in ITEMSIZE:
        raise InvalidArgument(name, f"{name}: unknown dtype {tensor.dtype}")
    if any(d < 0 for d in tensor.shape):
        raise InvalidArgument(name, f"{name}: negative dimension in shape {list(tensor.shape)}")
    if len(tensor.shape) > MAX_TENSOR_RANK or any(d > MAX_TENSOR_DIM for d in tensor.shape):
        raise InvalidArgument(name, f"{name}: shape {list(tensor.shape)[:8]} is beyond rank {MAX_TENSOR_RANK} "
                                    f"or a dimension of {MAX_TENSOR_DIM}")
    expected = math.prod(tensor.shape) * ITEMSIZE[tensor.dtype]
    if len(tensor.data) != expected:
        raise InvalidArgument(name, f"{name}: {len(tensor.data)} bytes, but dtype "
                                    f"{pb.DType.Name(tensor.dtype)} x shape {list(tensor.shape)} "
                                    f"needs {expected}")


def bucket(length: int, multiple: int = TOKEN_BUCKET) -> int:
    return max(multiple, -(-length // multiple) * multiple)


def pad_tokens(padded: pb.PaddedTensor, to: int) -> pb.PaddedTensor:
    """Re-pad a (B, N, D) token tensor along N to `to` tokens with zeros (only the
    first valid_length tokens are meaningful; the generator trims to them)."""
    t = padded.tensor
    check_tensor(t, "tokens")
    if len(t.shape) != 3:
        raise InvalidArgument("tokens", f"expected a (B, N, D) tensor, got shape {list(t.shape)}")
    batch, length, width = t.shape
    if to < padded.valid_length:
        raise InvalidArgument("pad_to", f"cannot pad {padded.valid_length} valid tokens to {to}")
    row = width * ITEMSIZE[t.dtype]
    keep = min(length, to)
    rows = []
    for b in range(batch):
        start = b * length * row
        rows.append(t.data[start:start + keep * row] + bytes((to - keep) * row))
    return pb.PaddedTensor(
        tensor=pb.Tensor(dtype=t.dtype, shape=[batch, to, width], data=b"".join(rows)),
        valid_length=padded.valid_length,
    )


def params_to_proto(params: dict) -> pb.GenerationParams:
    unknown = set(params) - ALL_PARAMETERS
    if unknown:
        name = sorted(unknown)[0]
        raise InvalidArgument(name, f"unknown parameter {name!r}")
    return pb.GenerationParams(**{k: v for k, v in params.items() if v is not None})


def params_from_proto(message: pb.GenerationParams) -> dict:
    """Only the fields that are set: unset means 'the mode's default'."""
    return {field.name: value for field, value in message.ListFields()}

