"""fp8 Linear layers for --turbo.

Weights are stored once in float8_e4m3fn with a scale per output row; activations are
scaled per row (or per tensor) on the fly, and the product is one `torch._scaled_mm`
(cuBLASLt / CUTLASS fp8 tensor cores on Hopper) with fast accumulation, as torchao's inference
fp8 does (Hopper's fp8 products accumulate in reduced precision between flushes; it is turbo's
trade, measured in BENCHMARKS.md). A plain module with buffers, not a
tensor subclass: torch.compile traces one graph per block class that every block shares,
so fp8 compiles as quickly as bf16 (torchao's subclass weights recompiled per block).

A product whose input is a tanh GELU's output (the MLPs' down-projections) takes the GELU's
input instead (`Fp8LinearOfGelu`): on CUDA one kernel evaluates the GELU, the rows' scales and
the e4m3 values with each row read once (`gelu_e4m3_rows`); Inductor's kernel for the same ops
read a row twice and evaluated the GELU twice, 195 us a single block on an H100 (BENCHMARKS.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
GRANULARITIES = ("row", "tensor")


def _scale(x: torch.Tensor, granularity: str) -> torch.Tensor:
    amax = x.abs().amax(dim=-1, keepdim=True) if granularity == "row" else x.abs().amax()
    return (amax.float() / E4M3_MAX).clamp(min=1e-12)


def _quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


class Fp8Linear(torch.nn.Module):
    """y = x W^T + b with W and x in e4m3; bias and output in the input's dtype."""

    def __init__(self, linear: torch.nn.Linear, granularity: str = "row"):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"fp8 granularity must be one of {GRANULARITIES}, not {granularity!r}")
        weight = linear.weight.detach()
        scale = _scale(weight, granularity)                       # (out, 1) or ()
        self._hold(_quantize(weight, scale), scale.reshape(1, -1) if granularity == "row" else scale,
                   linear.bias, granularity)

    def _hold(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
              granularity: str) -> None:
        self.out_features, self.in_features = weight.shape
        self.granularity = granularity
        self.register_buffer("weight", weight)                   # (out, in), row-major
        self.register_buffer("weight_scale", weight_scale)       # (1, out) or ()
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def _of(cls, weight, weight_scale, bias, granularity: str) -> "Fp8Linear":
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        layer._hold(weight, weight_scale, bias, granularity)
        return layer

    @classmethod
    def stacked(cls, layers: "list[Fp8Linear]") -> "Fp8Linear":
        """One layer whose outputs are those of `layers` (row-scaled, one input) side by side:
        the input quantized once and one product of the same weights (bitwise the same values on
        the CPU). The layers' weights become views of the stacked one, so they keep working and
        cost no memory; a later `.to()` would copy each view apart."""
        if any(layer.granularity != "row" or layer.in_features != layers[0].in_features for layer in layers):
            raise ValueError("only row-scaled fp8 layers of one input size stack")
        biased = [layer.bias for layer in layers if layer.bias is not None]
        bias = None if not biased else torch.cat([
            torch.zeros(layer.out_features, dtype=biased[0].dtype, device=biased[0].device)
            if layer.bias is None else layer.bias for layer in layers])
        stacked = cls._of(torch.cat([layer.weight for layer in layers]),
                          torch.cat([layer.weight_scale for layer in layers], dim=1), bias, "row")
        start = 0
        for layer in layers:
            stop = start + layer.out_features
            layer.weight, layer.weight_scale = stacked.weight[start:stop], stacked.weight_scale[:, start:stop]
            if layer.bias is not None:
                layer.bias = torch.nn.Parameter(stacked.bias[start:stop], requires_grad=False)
            start = stop
        return stacked

    def split_columns(self, split: int) -> "tuple[Fp8Linear, Fp8Linear]":
        """Two layers over the input's columns [:split] and [split:], the bias in the first: their
        outputs sum to this layer's on the concatenation (each input with scales of its own). The
        weights are contiguous copies: fp8 products read a column slice's stride only on Hopper
        (torch's sm89 kernel assumes a packed weight)."""
        return (Fp8Linear._of(self.weight[:, :split].contiguous(), self.weight_scale, self.bias, self.granularity),
                Fp8Linear._of(self.weight[:, split:].contiguous(), self.weight_scale, None, self.granularity))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        scale = _scale(rows, self.granularity)
        return self.product(_quantize(rows, scale), scale, x)

    def product(self, quantized: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The layer's output for `x` from its rows already in e4m3 with their scales."""
        out = torch._scaled_mm(quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=x.dtype, use_fast_accum=x.is_cuda)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, granularity={self.granularity}"


class Fp8LinearOfGelu(torch.nn.Module):
    """A row-scaled Fp8Linear of gelu(x, approximate="tanh"), given x: the GELU's output, rounded
    to x's dtype as a GELU layer's would be, is only ever seen by the quantization."""

    def __init__(self, linear: Fp8Linear):
        super().__init__()
        if linear.granularity != "row":
            raise ValueError("the GELU is folded into row-scaled fp8 layers only")
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.linear.in_features)
        quantized, scale = gelu_quantized_rows(rows)
        return self.linear.product(quantized, scale, x)


def gelu_quantized_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and per-row scales of gelu(rows, approximate="tanh") in rows' dtype: one
    kernel on CUDA for 16-bit rows of up to 32768 columns, torch's ops elsewhere (the same
    values, up to the GELU's last bit in fp32 where it rounds differently)."""
    if rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16) and rows.shape[-1] <= 32768:
        return torch.ops.qwen2vl_flux.gelu_e4m3_rows(rows)
    gelu = F.gelu(rows, approximate="tanh")
    scale = _scale(gelu, "row")
    return _quantize(gelu, scale), scale


@torch.library.custom_op("qwen2vl_flux::gelu_e4m3_rows", mutates_args=())
def gelu_e4m3_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An opaque op to torch.compile: Inductor runs the kernel as it is, between the products."""
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    quantized = torch.empty(rows.shape, device=rows.device, dtype=E4M3)
    scale = torch.empty(rows.shape[0], 1, device=rows.device, dtype=torch.float32)
    if rows.shape[0]:
        from .fp8_kernels import gelu_e4m3_rows_kernel

        block = max(16, 1 << (rows.shape[1] - 1).bit_length())
        with torch.cuda.device(rows.device):
            gelu_e4m3_rows_kernel[(rows.shape[0],)](
                rows, quantized, scale, rows.shape[1], rows.stride(0), E4M3_MAX, BLOCK=block,
                num_warps=max(1, min(16, block // 512)))
    return quantized, scale


@gelu_e4m3_rows.register_fake
def _(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows.new_empty(rows.shape, dtype=E4M3), rows.new_empty((rows.shape[0], 1), dtype=torch.float32)


def keeps_precision(name: str) -> bool:
    """The layers turbo leaves in bf16 (MODEL_NOTES "Turbo"): norms (with their modulation
    Linear), the top-level proj_out and x_embedder; context_embedder is kept apart already."""
    parts = name.split(".")
    return name in ("proj_out", "x_embedder", "context_embedder") or any(p.startswith("norm") for p in parts)


def quantize_linears(model: torch.nn.Module, granularity: str = "row") -> int:
    """Replace every Linear that `keeps_precision` allows by an Fp8Linear, in place; returns the count."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and not keeps_precision(name)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear(module, granularity))
    return len(targets)
