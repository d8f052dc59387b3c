"""An fp8 attention kernel of our own (Triton), to measure against cuDNN's bf16 attention: no
installable fp8 attention exists for this card (FA3 is not on the package index, FA4 cannot
travel to the GPU machine, SageAttention 1.0.6 was slower than cuDNN).

FlashAttention-2's forward with Q and K in e4m3 (one scale per block of 128 tokens and head);
then P and V either in e4m3 too (P scaled by 448, its largest value, as FA3 does; V one scale per
head) or in bf16 (SageAttention's choice: e4m3 P has 3 mantissa bits for small probabilities).
Softmax statistics stay fp32. Inputs (batch, heads, tokens, 128), no mask, not causal: FLUX's
joint attention.

  python bench/fp8_attention.py            # on the GPU host: speed and error against SDPA
  TRITON_INTERPRET=1 python bench/fp8_attention.py --check   # correctness on the CPU
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128   # tokens per Q/K scale


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """e4m3 copies and scales: Q and K per block of BLOCK tokens and head, V per head, stored
    transposed (tokens last) as Hopper's fp8 matrix instructions read it."""
    b, h, n, d = q.shape
    pad = (-n) % BLOCK

    def blockwise(x):
        blocks = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(b, h, -1, BLOCK, d)
        scale = blocks.abs().amax(dim=(-1, -2)).float().clamp_min(1e-12) / FP8_MAX
        x8 = (blocks / scale[..., None, None]).to(FP8).view(b, h, -1, d)[:, :, :n]
        return x8.contiguous(), scale.contiguous()
    q8, q_scale = blockwise(q)
    k8, k_scale = blockwise(k)
    v_scale = v.abs().amax(dim=(-1, -2)).float().clamp_min(1e-12) / FP8_MAX
    vt8 = (v / v_scale[..., None, None]).to(FP8).transpose(-1, -2).contiguous()
    return q8, q_scale, k8, k_scale, vt8, v_scale.contiguous()


CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
           for bn in (64, 128) for w in (4, 8) for s in (2, 3, 4)]


@triton.jit
def _tile(acc, m_i, l_i, q, c_q, start_n, K, KS, V, ks_base, base, N, offs_n, offs_d, HEAD_DIM: tl.constexpr,
          BLOCK_M: tl.constexpr, PV_FP8: tl.constexpr, MASKED: tl.constexpr):
    """One K/V tile of the online softmax. The scales fold into the exponent's one multiply-add;
    only the last, partial tile pays for masks."""
    cols = start_n + offs_n
    if MASKED:
        k = tl.load(K + base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=cols[:, None] < N, other=0.0)
    else:
        k = tl.load(K + base + cols[:, None] * HEAD_DIM + offs_d[None, :])
    c = c_q * tl.load(KS + ks_base + start_n // BLOCK_M)
    s = tl.dot(q, tl.trans(k))
    if MASKED:
        s = tl.where(cols[None, :] < N, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * c)
    p = tl.math.exp2(s * c - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if PV_FP8:   # V stored transposed, e4m3
        if MASKED:
            vt = tl.load(V + base + offs_d[:, None] * N + cols[None, :], mask=cols[None, :] < N, other=0.0)
        else:
            vt = tl.load(V + base + offs_d[:, None] * N + cols[None, :])
        acc = acc * alpha[:, None] + tl.dot((p * 448.0).to(tl.float8e4nv), tl.trans(vt))
    else:
        if MASKED:
            v = tl.load(V + base + cols[:, None] * HEAD_DIM + offs_d[None, :], mask=cols[:, None] < N, other=0.0)
        else:
            v = tl.load(V + base + cols[:, None] * HEAD_DIM + offs_d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _forward_kernel(Q, QS, K, KS, V, VS, O, N, sm_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    n_blocks = tl.cdiv(N, BLOCK_M)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = bh.to(tl.int64) * N * HEAD_DIM
    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
    c_q = tl.load(QS + bh * n_blocks + start_m) * sm_scale * 1.4426950408889634   # log2(e)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, c_q, start_n, K, KS, V, bh * n_blocks, base, N, offs_n, offs_d,
                              HEAD_DIM, BLOCK_M, PV_FP8, False)
    if n_full < N:
        acc, m_i, l_i = _tile(acc, m_i, l_i, q, c_q, n_full, K, KS, V, bh * n_blocks, base, N, offs_n, offs_d,
                              HEAD_DIM, BLOCK_M, PV_FP8, True)
    if PV_FP8:
        out = acc * (tl.load(VS + bh) / 448.0 / l_i)[:, None]
    else:
        out = acc / l_i[:, None]
    tl.store(O + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=offs_m[:, None] < N)


_forward = triton.autotune(configs=CONFIGS, key=["N", "HEAD_DIM", "PV_FP8"])(_forward_kernel)


def attention(q8, q_scale, k8, k_scale, vt8, v_scale, v=None, out_dtype=torch.bfloat16,
              block_n: int | None = None) -> torch.Tensor:
    """With `v` (the bf16 values) P and V multiply in bf16, else in e4m3. `block_n` fixes the
    tile instead of autotuning (the CPU interpreter cannot time configs)."""
    b, h, n, d = q8.shape
    out = torch.empty((b, h, n, d), device=q8.device, dtype=out_dtype)
    # A K scale block must not straddle BLOCK_N tiles: BLOCK_N divides BLOCK (64 or 128).
    grid = (triton.cdiv(n, BLOCK), b * h)
    kernel = _forward if block_n is None else _forward_kernel
    extra = {} if block_n is None else {"BLOCK_N": block_n}
    kernel[grid](q8, q_scale, k8, k_scale, vt8 if v is None else v, v_scale, out, n, 1.0 / math.sqrt(d),
                 HEAD_DIM=d, BLOCK_M=BLOCK, PV_FP8=v is None, **extra)
    return out


def _error(out: torch.Tensor, ref: torch.Tensor) -> dict:
    diff = (out.float() - ref.float())
    return {"max_abs": diff.abs().max().item(), "rel_rms": (diff.pow(2).mean() / ref.float().pow(2).mean()).sqrt().item(),
            "cosine": torch.nn.functional.cosine_similarity(out.float().flatten(), ref.float().flatten(), 0).item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="small shapes on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.check:
        for n in (200, 256, 77):
            q, k, v = (torch.randn(1, 2, n, 128) for _ in range(3))
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            for block_n in (64, 128):
                for pv in ("fp8", "bf16"):
                    # fp32 values here: the interpreter reads bf16 as raw bits
                    out = attention(*quantize(q, k, v), v=None if pv == "fp8" else v,
                                    out_dtype=torch.float32, block_n=block_n)
                    print(json.dumps({"tokens": n, "block_n": block_n, "pv": pv, **_error(out, ref)}))
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    for n in (4608, 4864, 4096 + 531):
        q, k, v = (torch.randn(1, 24, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * 24 * n * n * 128
        row = {"tokens": n}
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            with sdpa_kernel([backend]):
                ms = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            row[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9)}
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        packed = quantize(q, k, v)
        for pv, values in (("fp8", None), ("bf16", v)):
            ms = do_bench(lambda: attention(*packed, v=values))
            row[f"qk_fp8_pv_{pv}"] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9),
                                      "config": str(_forward.best_config),
                                      "error_vs_cudnn": _error(attention(*packed, v=values), ref)}
        row["quantize_eager_ms"] = round(do_bench(lambda: quantize(q, k, v)), 4)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
