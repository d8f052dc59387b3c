"""Triton kernels of turbo's fp8 layers (CUDA only; imported when first launched)."""
try:   # torch's CUDA builds install triton; CPU-only installs never import this module
    import triton
    import triton.language as tl
except ImportError as e:
    raise ImportError("turbo's fp8 kernels need triton, which torch's CUDA builds install: install the triton "
                      "release that your torch names (pip show torch) or run without --turbo") from e


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def gelu_e4m3_rows_kernel(rows_ptr, out_ptr, scale_ptr, columns, row_stride, e4m3_max, BLOCK: tl.constexpr):
    """One row a program, held in registers: read once, the tanh GELU evaluated once, in fp32 as
    torch's CUDA GELU evaluates it and rounded to the rows' dtype, then the row's amax, scale and
    e4m3 values as fp8._scale and fp8._quantize compute them: a NaN makes its row's scale and
    values NaN, and the divisions are Triton's, as in Inductor's kernels (div.full, within 2 ulp
    of torch's eager division)."""
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    inside = offsets < columns
    h = tl.load(rows_ptr + row * row_stride + offsets, mask=inside, other=0.0)
    x = h.to(tl.float32)
    inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
    gelu = (0.5 * x * (1.0 + tl.extra.libdevice.tanh(inner))).to(h.dtype).to(tl.float32)
    amax = tl.reduce(tl.abs(gelu), 0, _max_keeping_nan)
    scale = tl.maximum(amax / e4m3_max, 1e-12, propagate_nan=tl.PropagateNan.ALL)
    values = tl.clamp(gelu / scale, -e4m3_max, e4m3_max, propagate_nan=tl.PropagateNan.ALL)
    tl.store(out_ptr + row * columns + offsets, values.to(tl.float8e4nv), mask=inside)
    tl.store(scale_ptr + row, scale)
