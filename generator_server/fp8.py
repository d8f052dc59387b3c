"""fp8 Linear layers for --turbo.

Weights are stored once in float8_e4m3fn with a scale per output row; activations are
scaled per row (or per tensor) on the fly, and the product is one `torch._scaled_mm`
(cuBLASLt / CUTLASS fp8 tensor cores on Hopper) with fast accumulation, as torchao's inference
fp8 does (Hopper's fp8 products accumulate in reduced precision between flushes; it is turbo's
trade, measured in BENCHMARKS.md). A plain module with buffers, not a
tensor subclass: torch.compile traces one graph per block class that every block shares,
so fp8 compiles as quickly as bf16 (torchao's subclass weights recompiled per block).
"""
from __future__ import annotations

import torch

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
        self.in_features, self.out_features, self.granularity = linear.in_features, linear.out_features, granularity
        weight = linear.weight.detach()
        scale = _scale(weight, granularity)                       # (out, 1) or ()
        self.register_buffer("weight", _quantize(weight, scale))  # (out, in), row-major
        self.register_buffer("weight_scale", scale.reshape(1, -1) if granularity == "row" else scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    @classmethod
    def stacked(cls, layers: "list[Fp8Linear]") -> "Fp8Linear":
        """One layer whose outputs are those of `layers` (row-scaled, one input) side by side:
        the input quantized once and one product, the same values. The layers' weights become
        views of the stacked one, so they keep working and cost no memory."""
        if any(layer.granularity != "row" or layer.in_features != layers[0].in_features for layer in layers):
            raise ValueError("only row-scaled fp8 layers of one input size stack")
        stacked = cls.__new__(cls)
        torch.nn.Module.__init__(stacked)
        stacked.in_features, stacked.granularity = layers[0].in_features, "row"
        stacked.out_features = sum(layer.out_features for layer in layers)
        stacked.register_buffer("weight", torch.cat([layer.weight for layer in layers]))
        stacked.register_buffer("weight_scale", torch.cat([layer.weight_scale for layer in layers], dim=1))
        biases = [layer.bias if layer.bias is not None else
                  torch.zeros(layer.out_features, dtype=layers[0].bias.dtype, device=layer.weight.device)
                  for layer in layers] if any(layer.bias is not None for layer in layers) else None
        stacked.bias = None if biases is None else torch.nn.Parameter(torch.cat(biases), requires_grad=False)
        start = 0
        for layer in layers:
            stop = start + layer.out_features
            layer.weight, layer.weight_scale = stacked.weight[start:stop], stacked.weight_scale[:, start:stop]
            if layer.bias is not None:
                layer.bias = torch.nn.Parameter(stacked.bias[start:stop], requires_grad=False)
            start = stop
        return stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.columns(x, 0, self.in_features)

    def columns(self, x: torch.Tensor, start: int, stop: int, bias: bool = True) -> torch.Tensor:
        """x W[:, start:stop]^T (+ b): the product with a range of the weight's columns (a view),
        x scaled by its own rows' range."""
        rows = x.reshape(-1, stop - start)
        scale = _scale(rows, self.granularity)
        out = torch._scaled_mm(_quantize(rows, scale), self.weight[:, start:stop].t(), scale_a=scale,
                               scale_b=self.weight_scale, bias=self.bias if bias else None, out_dtype=x.dtype,
                               use_fast_accum=rows.is_cuda)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, granularity={self.granularity}"


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
