"""Triton kernels of turbo's fp8 layers (CUDA only; imported when first launched)."""
import triton
import triton.language as tl


@triton.jit
def gelu_e4m3_rows_kernel(rows_ptr, out_ptr, scale_ptr, columns, row_stride, e4m3_max, BLOCK: tl.constexpr):
    """One row a program, held in registers: read once, the tanh GELU evaluated once, in fp32 as
    torch's CUDA GELU evaluates it and rounded to the rows' dtype, then the row's amax, scale and
    e4m3 values as fp8._scale and fp8._quantize compute them."""
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    inside = offsets < columns
    h = tl.load(rows_ptr + row * row_stride + offsets, mask=inside, other=0.0)
    x = h.to(tl.float32)
    inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
    gelu = (0.5 * x * (1.0 + tl.extra.libdevice.tanh(inner))).to(h.dtype).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(gelu), axis=0) / e4m3_max, 1e-12)
    values = tl.minimum(tl.maximum(gelu / scale, -e4m3_max), e4m3_max)
    tl.store(out_ptr + row * columns + offsets, values.to(tl.float8e4nv), mask=inside)
    tl.store(scale_ptr + row, scale)
