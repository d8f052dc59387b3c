"""Per-step probe of the generator's speed options on one GPU, full-size random weights.

  python bench/probe.py --out DIR [--sections peak,gemm,single_mlp,fp8_gelu_rows,single_attention,kernels,attention,step,vae,png,shapes,startup,restart,first_request,served_steps] [--budget 540]

Times one FLUX.1-dev transformer call at 1024x1024 (4096 image + 768 text tokens) for each
option (eager, regional compile, fused QKV, Inductor flags, fp8 row/tensor-wise), with its
compile time and dynamo recompiles, then the VAE decode and image encoding per format.
`kernels` profiles the generator's own compiled call (4096 + 512 tokens) by kernel kind, keeps
each trace as DIR/trace-VARIANT.json.gz and replays the call as one CUDA graph (--kernel-variants
default,turbo,descent,...); `gemm` times cuBLAS at the step's own Linear shapes, `single_mlp` a
single block's MLP half with cuBLASLt's GELU epilogue against Inductor's fusion, `fp8_gelu_rows`
turbo's GELU + row amax + e4m3 of those hidden states several ways, the served kernel among them.
Each result is appended to DIR/probe.jsonl at once, so a run cut short keeps what it measured.
Sections past --budget seconds are skipped.
"""
from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import torch

from flops import transformer_step_flops
from qwen2vl_flux.checkpoints import full_size

START = time.perf_counter()


def emit(out: Path, **row) -> None:
    row["at_s"] = round(time.perf_counter() - START, 1)
    with (out / "probe.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def timed(fn, runs: int = 5, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def once(fn) -> float:
    """Seconds of one call, the GPU finished (a first call: compilation included)."""
    begin = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - begin


def peak(out: Path) -> None:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    flops = 2 * 8192 ** 3
    emit(out, section="peak", kind="bf16_matmul_tflops", value=flops / timed(lambda: a @ b, 10, 3) / 1e12)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.tensor(1.0, device="cuda")
    emit(out, section="peak", kind="fp8_tensorwise_tflops",
         value=flops / timed(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                             10, 3) / 1e12)
    ra, rb = torch.ones(8192, 1, device="cuda"), torch.ones(1, 8192, device="cuda")
    emit(out, section="peak", kind="fp8_rowwise_tflops",
         value=flops / timed(lambda: torch._scaled_mm(a8, b8, scale_a=ra, scale_b=rb, out_dtype=torch.bfloat16),
                             10, 3) / 1e12)


def attention(out: Path) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, 24, 4864, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * 4864 * 4864 * 128 * 24
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            s = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), 20, 3)
        emit(out, section="attention", kind=name, seconds=s, tflops=flops / s / 1e12)
    try:
        from sageattention import sageattn

        s = timed(lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False), 20, 3)
        emit(out, section="attention", kind="sage", seconds=s, tflops=flops / s / 1e12)
    except Exception as e:  # noqa: BLE001
        emit(out, section="attention", kind="sage", error=f"{type(e).__name__}: {e}"[:300])


def transformer_inputs(text: int = 768, side: int = 1024):
    n = (side // 16) ** 2
    dev, dt = "cuda", torch.bfloat16
    from diffusers import FluxPipeline

    return dict(hidden_states=torch.randn(1, n, 64, device=dev, dtype=dt),
                encoder_hidden_states=torch.randn(1, text, 3072, device=dev, dtype=dt),
                pooled_projections=torch.randn(1, 768, device=dev, dtype=dt),
                timestep=torch.full([1], 0.5, device=dev, dtype=dt), guidance=torch.full([1], 3.5, device=dev),
                txt_ids=torch.zeros(text, 3, device=dev, dtype=dt),
                img_ids=FluxPipeline._prepare_latent_image_ids(1, side // 16, side // 16, dev, dt),
                return_dict=False)


def step(out: Path, deadline: float, variants: list[str]) -> None:
    import torch._dynamo
    import torch._inductor.config as inductor

    from qwen2vl_flux.generator_server.blocks import repeated_blocks
    from qwen2vl_flux.generator_server.fp8 import quantize_linears

    begin = time.perf_counter()
    model = full_size.flux_transformer("cuda", torch.bfloat16)
    model.context_embedder = torch.nn.Identity()
    model.set_attention_backend("_native_cudnn")
    emit(out, section="step", kind="build", seconds=time.perf_counter() - begin)
    inputs = transformer_inputs()
    flops = transformer_step_flops(model.config, 4096, 768)["total"]
    emit(out, section="step", kind="flops", tflop=flops / 1e12)
    compiled = False
    for variant in variants:
        if time.perf_counter() - START > deadline:
            emit(out, section="step", kind=variant, skipped="budget")
            continue
        try:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            if compiled:   # undo the previous variant's compile wrappers
                for block in repeated_blocks(model):
                    block._compiled_call_impl = None
            if variant == "fused_qkv":
                model.fuse_qkv_projections()
            if variant == "flags":
                inductor.conv_1x1_as_mm = True
                inductor.epilogue_fusion = False
                inductor.coordinate_descent_tuning = True
                inductor.coordinate_descent_check_all_directions = True
            if variant.startswith("fp8_"):
                quantize_linears(model, variant.removeprefix("fp8_"))
            if variant != "eager":
                model.compile_repeated_blocks(fullgraph=True)
                compiled = True
            with torch.inference_mode():
                compile_s = once(lambda: model(**inputs))
                s = timed(lambda: model(**inputs), 5, 1)
                other = transformer_inputs(text=520 + 256, side=1024)
                second_text = once(lambda: model(**other))
                wide = transformer_inputs(text=768, side=1344 // 16 * 16)
                new_size = once(lambda: model(**wide))
            emit(out, section="step", kind=variant, seconds=s, mfu=flops / s / 790e12, first_call=compile_s,
                 other_text_first=second_text, other_size_first=new_size,
                 recompiles=dict(torch._dynamo.utils.counters.get("recompiles", {})) or None,
                 frames=dict(torch._dynamo.utils.counters["stats"]))
        except Exception as e:  # noqa: BLE001
            emit(out, section="step", kind=variant, error=f"{type(e).__name__}: {e}"[:500])
            if variant.startswith("fp8_"):
                break


# FLUX.1-dev's Linear shapes in one step at 4096 image + 512 text tokens: (rows, in, out, count)
FLUX_LINEARS = [(4096, 3072, 3072, 19 * 4), (512, 3072, 3072, 19 * 4), (4096, 3072, 12288, 19),
                (4096, 12288, 3072, 19), (512, 3072, 12288, 19), (512, 12288, 3072, 19),
                (4608, 3072, 3072, 38 * 3), (4608, 3072, 12288, 38), (4608, 15360, 3072, 38)]
# the same work as fewer, wider products (fused projections)
FUSED_LINEARS = [(4096, 3072, 9216, 19), (512, 3072, 9216, 19), (4608, 3072, 21504, 38)]


def gemm(out: Path) -> None:
    """cuBLAS at the step's own shapes, bf16 and fp8 row-wise: the floor of the linears in one step."""
    one_step = {"bf16": 0.0, "fp8_row": 0.0}
    for rows, k, n, count in FLUX_LINEARS + FUSED_LINEARS:
        a = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        flops = 2 * rows * k * n
        row = {"rows": rows, "in_features": k, "out_features": n, "per_step": count}
        s = timed(lambda: torch.nn.functional.linear(a, w, bias), 20, 3)
        row["bf16_tflops"] = round(flops / s / 1e12)
        a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        sa, sw = torch.ones(rows, 1, device="cuda"), torch.ones(1, n, device="cuda")
        s8 = timed(lambda: torch._scaled_mm(a8, w8.t(), scale_a=sa, scale_b=sw, bias=bias, out_dtype=torch.bfloat16,
                                            use_fast_accum=True), 20, 3)
        row["fp8_row_tflops"] = round(flops / s8 / 1e12)
        if (rows, k, n, count) in FLUX_LINEARS:
            one_step["bf16"] += s * count
            one_step["fp8_row"] += s8 * count
        emit(out, section="gemm", **row)
    emit(out, section="gemm", kind="linears_of_one_step_seconds", **{k: round(v, 4) for k, v in one_step.items()})


def single_mlp(out: Path) -> None:
    """A single block's MLP half at 4608 tokens, the stock way (proj_mlp, tanh GELU, concatenated
    with the attention output, proj_out; Inductor fuses the GELU into the concatenation) against
    cuBLASLt's GELU epilogue (`torch._addmm_activation`) with proj_out split in two products (no
    concatenation) or with the GELU product written into the concatenation's buffer."""
    rows, dim, hidden = 4608, 3072, 12288
    dev, dt = "cuda", torch.bfloat16
    x, attn = torch.randn(rows, dim, device=dev, dtype=dt), torch.randn(rows, dim, device=dev, dtype=dt)
    w_mlp, b_mlp = torch.randn(hidden, dim, device=dev, dtype=dt) / 50, torch.randn(hidden, device=dev, dtype=dt)
    w_out, b_out = torch.randn(dim, dim + hidden, device=dev, dtype=dt) / 100, torch.randn(dim, device=dev, dtype=dt)
    w_attn_part, w_mlp_part = w_out[:, :dim].contiguous(), w_out[:, dim:].contiguous()
    gelu = torch.nn.functional.gelu
    linear = torch.nn.functional.linear

    def stock(x, attn):
        return linear(torch.cat([attn, gelu(linear(x, w_mlp, b_mlp), approximate="tanh")], dim=1), w_out, b_out)

    def epilogue_split(x, attn):
        mlp = torch._addmm_activation(b_mlp, x, w_mlp.t(), use_gelu=True)
        return torch.addmm(b_out, attn, w_attn_part.t()).addmm_(mlp, w_mlp_part.t())

    buffer = torch.empty(rows, dim + hidden, device=dev, dtype=dt)

    def epilogue_into_cat(x, attn):
        torch._addmm_activation(b_mlp, x, w_mlp.t(), use_gelu=True, out=buffer[:, dim:])
        buffer[:, :dim].copy_(attn)
        return linear(buffer, w_out, b_out)

    def epilogue_cat(x, attn):
        return linear(torch.cat([attn, torch._addmm_activation(b_mlp, x, w_mlp.t(), use_gelu=True)], dim=1),
                      w_out, b_out)

    with torch.inference_mode():
        reference = stock(x, attn).float()
        compiled = torch.compile(stock, fullgraph=True)
        for name, fn in [("stock_eager", stock), ("stock_compiled", compiled), ("epilogue_split", epilogue_split),
                         ("epilogue_into_cat", epilogue_into_cat), ("epilogue_cat", epilogue_cat)]:
            try:
                s = timed(lambda: fn(x, attn), 20, 3)
                diff = (fn(x, attn).float() - reference).abs()
                emit(out, section="single_mlp", kind=name, seconds=s, max_abs_vs_eager=diff.max().item(),
                     mean_abs_vs_eager=diff.mean().item(), reference_mean_abs=reference.abs().mean().item())
            except Exception as e:  # noqa: BLE001
                emit(out, section="single_mlp", kind=name, error=f"{type(e).__name__}: {e}"[:500])


GELU_PEAK_X = -0.7524614   # where the tanh GELU is lowest (its |value| highest) on x < 0


def gelu_rows_fp8(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """turbo as it quantizes a single block's MLP hidden states for proj_out: the tanh GELU, its
    rows' amax, e4m3 (`fp8.Fp8Linear`). Inductor reads a row twice and evaluates the GELU in both."""
    from qwen2vl_flux.generator_server.fp8 import _quantize, _scale

    g = torch.nn.functional.gelu(h, approximate="tanh")
    scale = _scale(g, "row")
    return _quantize(g, scale), scale


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to bf16's (to nearest, ties to even), kept fp32: by their bits, since
    Inductor may drop a cast to bf16 and back, and the served path's GELU values are bf16."""
    bits = x.view(torch.int32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).view(torch.float32)


def gelu_rows_fp8_from_extremes(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same values with the GELU evaluated once: |gelu| rises with x on [0, inf) and on
    (-inf, GELU_PEAK_X] and falls on [GELU_PEAK_X, 0), so a row's largest |gelu| is that of its
    largest x, of its largest x <= GELU_PEAK_X or of its smallest x in (GELU_PEAK_X, 0), found by
    three reductions without the GELU (rounding to bf16 keeps the order)."""
    from qwen2vl_flux.generator_server.fp8 import E4M3_MAX, _quantize

    gelu = torch.nn.functional.gelu
    top = h.amax(-1, keepdim=True)
    left = torch.where(h <= GELU_PEAK_X, h, -1e4).amax(-1, keepdim=True)   # gelu(-1e4) = 0
    right = torch.where((h > GELU_PEAK_X) & (h < 0), h, 0).amin(-1, keepdim=True)
    amax = gelu(torch.cat([top, left, right], -1).float(), approximate="tanh").abs().amax(-1, keepdim=True)
    scale = (round_to_bf16(amax) / E4M3_MAX).clamp(min=1e-12)
    return _quantize(round_to_bf16(gelu(h.float(), approximate="tanh")), scale), scale


def gelu_rows_fp8_reciprocal(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`gelu_rows_fp8` with the values times the scale's reciprocal, not divided by it (a
    division is some ten instructions an element on the GPU, a multiply one)."""
    from qwen2vl_flux.generator_server.fp8 import E4M3, E4M3_MAX, _scale

    g = torch.nn.functional.gelu(h, approximate="tanh")
    scale = _scale(g, "row")
    return (g.float() * scale.reciprocal()).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def fp8_gelu_rows(out: Path) -> None:
    """turbo's largest Inductor kernel (7.4 ms of a 97.8 ms call on 2026-12-07): a single block's
    MLP hidden states, columns 9216: of the stacked product's 4608 x 21504 output, through the tanh
    GELU, their rows' amax and e4m3, compiled as the generator compiles it, with Inductor's
    multi_kernel (a one-pass persistent reduction tried too), and with the scale from the
    pre-activation's extremes (`gelu_rows_fp8_from_extremes`), with the scale's reciprocal, and
    as the generator runs it since it folds the GELU into the quantization (`served_kernel`:
    fp8.gelu_quantized_rows, one Triton kernel); a copy of the same columns to e4m3 is the
    memory floor."""
    from qwen2vl_flux.generator_server.fp8 import gelu_quantized_rows

    stacked = torch.randn(4608, 21504, device="cuda", dtype=torch.bfloat16) * 2
    h = stacked[:, 9216:]
    reference = None   # the first candidate's, the generator's compiled path
    candidates = [("compiled", gelu_rows_fp8, {}), ("multi_kernel", gelu_rows_fp8, {"triton.multi_kernel": 1}),
                  ("extremes", gelu_rows_fp8_from_extremes, {}),
                  ("extremes_multi_kernel", gelu_rows_fp8_from_extremes, {"triton.multi_kernel": 1}),
                  ("reciprocal", gelu_rows_fp8_reciprocal, {}),
                  ("reciprocal_multi_kernel", gelu_rows_fp8_reciprocal, {"triton.multi_kernel": 1}),
                  ("served_kernel", gelu_quantized_rows, None),
                  ("copy_floor", lambda h: (h.to(torch.float8_e4m3fn), None), {})]
    with torch.inference_mode():
        for name, fn, options in candidates:
            try:
                torch._dynamo.reset()
                compiled = fn if options is None else torch.compile(fn, fullgraph=True, options=options)
                begin = time.perf_counter()
                q, scale = compiled(h)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - begin
                seconds = timed(lambda: compiled(h), 20, 3)
                reference = reference or (q, scale)
                same = {} if scale is None else {
                    "scales_equal": bool(torch.equal(scale, reference[1])),
                    "values_differing": int((q.view(torch.uint8) != reference[0].view(torch.uint8)).sum())}
                emit(out, section="fp8_gelu_rows", kind=name, seconds=seconds, compile_s=round(compile_s, 1),
                     gbytes_per_s=round((h.numel() * 3) / seconds / 1e9), **same)
            except Exception as e:  # noqa: BLE001
                emit(out, section="fp8_gelu_rows", kind=name, error=f"{type(e).__name__}: {e}"[:500])


def profiled_summary(prof, raw: Path, keep: bool = False) -> dict:
    """`trace_summary` of a finished profile, exported to `raw`; kept gzipped beside it
    (`raw`.gz) when `keep`, else removed."""
    import gzip
    import shutil

    prof.export_chrome_trace(str(raw))
    if keep:
        with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    summary = trace_summary(raw)
    raw.unlink()
    return summary


def trace_summary(path: Path) -> dict:
    """GPU time of one profiled call by kind of kernel, and how much of the span the GPU was idle."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("cat") == "kernel"]
    kinds: dict[str, float] = {}
    names: dict[str, list] = {}
    for e in events:
        name = e["name"]
        low = name.lower()
        # Inductor names its kernels after the ops they fuse ("..._scaled_dot_product_cudnn_attention_..."):
        # Triton first, then attention and products by library kernel name
        kind = ("triton" if low.startswith("triton") else
                "attention" if any(w in low for w in ("fmha", "cudnn", "flash", "sdpa")) else
                "gemm" if any(w in low for w in ("gemm", "nvjet", "sm90_xmma", "cutlass", "matmul")) else "other")
        kinds[kind] = kinds.get(kind, 0.0) + e["dur"]
        entry = names.setdefault(name[:90], [0, 0.0])
        entry[0] += 1
        entry[1] += e["dur"]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    busy, end = 0.0, spans[0][0]
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:40]
    return {"span_ms": round((spans[-1][1] - spans[0][0]) / 1e3, 2), "busy_ms": round(busy / 1e3, 2),
            "kernels": len(events), "by_kind_ms": {k: round(v / 1e3, 2) for k, v in kinds.items()},
            "top": [(n, c, round(t / 1e3, 3)) for n, (c, t) in top]}


def kernels(out: Path, checkpoints: str, variants: list[str], deadline: float) -> None:
    """One transformer call of the generator as it serves (compiled blocks, cuDNN attention) at
    4096 + 512 tokens: its time, a profile of its kernels by kind (trace kept as
    OUT/trace-VARIANT.json.gz, "+" as "_"), and the same call replayed as one CUDA graph. Variants: default,
    turbo (fp8 linears), fused (diffusers' fused QKV projections), autotune (Inductor's
    max-autotune for the products, epilogues fused), descent (Inductor's coordinate-descent tuning
    of its own kernels, as flux-fast sets it), multikernel (Inductor's multi_kernel: a reduction up
    to 16 x longer, such as turbo's amax over a GELU row of 12288, also gets a one-pass persistent
    kernel, and the faster of the two is picked at run time), stepmod (the AdaLN modulation products at every
    step, not ahead for many: modulation.py), unfused (diffusers' GELU kernels and proj_out
    concatenation: blocks.fuse_products off; with turbo, its arrangement before 2026-12-07 20:00Z),
    unstacked (turbo's products of one input apart: blocks.stack_inputs off), unfolded (turbo's
    GELUs apart from the quantization after them, Inductor's kernels: blocks.fold_gelu off), copies (diffusers'
    attention processor, whose layouts cost a copy of the single blocks' V and of every block's
    output: blocks.strided_attention off), static and dynamic (torch.compile of the blocks with
    static or symbolic token counts, not the generator's precompiled path)."""
    import torch._dynamo
    import torch._inductor.config as inductor
    from torch.profiler import ProfilerActivity, profile

    from qwen2vl_flux.generator_server import blocks, modulation
    from qwen2vl_flux.generator_server.pipeline import FluxGenerator, SpeedOptions

    inputs = transformer_inputs(text=512)
    backends = inductor.max_autotune_gemm_backends
    for variant in variants:
        if time.perf_counter() - START > deadline:
            emit(out, section="kernels", kind=variant, skipped="budget")
            continue
        begin = time.perf_counter()
        torch._dynamo.reset()
        words = set(variant.split("+"))   # e.g. turbo+descent
        generator = FluxGenerator(checkpoints, device="cuda", dtype=torch.bfloat16, random_weights="full")
        if "fused" in words:
            generator.transformer.fuse_qkv_projections()
        # Inductor's flags set for every variant, so none outlives the variant that asked for it
        inductor.max_autotune_gemm = "autotune" in words
        inductor.max_autotune_gemm_backends = "ATEN,TRITON" if "autotune" in words else backends
        inductor.triton.multi_kernel = int("multikernel" in words)
        inductor.coordinate_descent_tuning = inductor.coordinate_descent_check_all_directions = "descent" in words
        regional = bool(words & {"static", "dynamic"})
        install, fuse, strided, stack, fold = (modulation.install, blocks.fuse_products, blocks.strided_attention,
                                               blocks.stack_inputs, blocks.fold_gelu)
        if "unstacked" in words:   # turbo's products of one input apart, as before blocks.stack_inputs
            blocks.stack_inputs = lambda block: None
        if "unfolded" in words:   # turbo's GELUs as Inductor compiles them, as before blocks.fold_gelu
            blocks.fold_gelu = lambda block: None
        if "copies" in words:   # diffusers' attention processor and its layout copies (blocks.strided_attention off)
            blocks.strided_attention = lambda model: None
        if "stepmod" in words:   # the AdaLN products one step at a time, as before modulation.py
            modulation.install = lambda model: 0
        if "unfused" in words:   # diffusers' GELU kernels and concatenation, as before blocks.fuse_products
            blocks.fuse_products = lambda model: None
        try:
            generator.optimize(SpeedOptions(compile=not regional, attention="_native_cudnn", turbo="turbo" in words))
        finally:
            modulation.install, blocks.fuse_products, blocks.strided_attention, blocks.stack_inputs, \
                blocks.fold_gelu = install, fuse, strided, stack, fold
        model = generator.transformer
        if modulation.modulated(model):
            modulation.ModulationSchedule([model], inputs["timestep"] * 1000, pooled=inputs["pooled_projections"],
                                          guidance=inputs["guidance"], dtype=torch.bfloat16).select(0)
        if regional:
            model.compile_repeated_blocks(fullgraph=True, dynamic="dynamic" in words)
        with torch.inference_mode():
            first = once(lambda: model(**inputs))
            s = timed(lambda: model(**inputs), 7, 2)
            emit(out, section="kernels", kind=variant, seconds=s, first_call=first,
                 built_s=time.perf_counter() - begin)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                model(**inputs)
                torch.cuda.synchronize()
            summary = profiled_summary(prof, out / f"trace-{variant.replace('+', '_')}.json", keep=True)
            emit(out, section="kernels", kind=variant, **summary)
            try:
                reference = model(**inputs)[0].clone()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    model(**inputs)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    captured = model(**inputs)[0]
                g = timed(graph.replay, 7, 2)
                emit(out, section="kernels", kind=f"{variant}_cuda_graph", seconds=g,
                     max_abs_vs_plain=(captured.float() - reference.float()).abs().max().item())
                del graph, captured
            except Exception as e:  # noqa: BLE001
                emit(out, section="kernels", kind=f"{variant}_cuda_graph", error=f"{type(e).__name__}: {e}"[:500])
        generator = model = None
        inductor.max_autotune_gemm = inductor.coordinate_descent_tuning = False
        torch.cuda.empty_cache()


def single_attention(out: Path) -> None:
    """A single block's attention path alone (to_q/k/v, RMSNorm, RoPE, cuDNN attention, the
    output flattened) at 4096 + 512 tokens, compiled, per layout of Q, K and V, with its kernels
    (`top`); then cuDNN's attention alone on contiguous (B, H, S, D) inputs and on (B, S, H, D)
    ones seen through a transpose. Asked why a single block's attention took 0.45 ms to a double
    block's 0.40 ms in the served call: not the layout (every layout 0.43 ms alone), but the
    card's power limit, which slows the same kernel as the call goes on (BENCHMARKS.md).
    `heads_first` is what blocks.StridedAttnProcessor does. Leaves diffusers' active attention
    backend as it found it."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    active = _AttentionBackendRegistry._active_backend
    try:
        _single_attention(out)
    finally:
        _AttentionBackendRegistry.set_active_backend(active)


def _single_attention(out: Path) -> None:
    import torch._dynamo
    import torch.nn.functional as F
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusers.models.embeddings import apply_rotary_emb
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    model = FluxTransformer2DModel(num_layers=1, num_single_layers=1).to("cuda", torch.bfloat16)
    model.set_attention_backend("_native_cudnn")
    attn = model.single_transformer_blocks[0].attn
    ids = torch.cat([torch.zeros(512, 3, device="cuda"),
                     FluxPipeline._prepare_latent_image_ids(1, 64, 64, "cuda", torch.float32)])
    rope = model.pos_embed(ids)
    x = torch.randn(1, 4608, 3072, device="cuda", dtype=torch.bfloat16)

    def qkv(x):
        return [layer(x).unflatten(-1, (24, 128)) for layer in (attn.to_q, attn.to_k, attn.to_v)]

    def diffusers_path(x):
        return attn(hidden_states=x, image_rotary_emb=rope)

    def views(x):   # (B, S, H, D) buffers, attention through transposed views
        q, k, v = qkv(x)
        q, k = (apply_rotary_emb(norm(t), rope, sequence_dim=1) for norm, t in ((attn.norm_q, q), (attn.norm_k, k)))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2).flatten(2)

    def heads_first(x):   # Q and K in (B, H, S, D) from the norm on, V through a view
        q, k, v = qkv(x)
        q, k = (apply_rotary_emb(norm(t).transpose(1, 2), rope, sequence_dim=2)
                for norm, t in ((attn.norm_q, q), (attn.norm_k, k)))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))
        return o.transpose(1, 2).flatten(2)

    with torch.inference_mode():
        reference = diffusers_path(x).float()
        for name, fn in (("diffusers", diffusers_path), ("views", views), ("heads_first", heads_first)):
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True)
            first = once(lambda: compiled(x))
            s = timed(lambda: compiled(x), 20, 3)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                compiled(x)
                torch.cuda.synchronize()
            summary = profiled_summary(prof, out / f"trace-single-attention-{name}.json")
            emit(out, section="single_attention", kind=name, seconds=s, first_call=first,
                 max_abs_vs_diffusers=(compiled(x).float() - reference).abs().max().item(), **summary)
        flops = 4 * 4608 * 4608 * 128 * 24
        bhsd = [torch.randn(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        bshd = [torch.randn(1, 4608, 24, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]
        layouts = {"bhsd": bhsd, "bshd_views": bshd, "qk_bhsd_v_bshd": bhsd[:2] + bshd[2:],
                   "q_bhsd_kv_bshd": bhsd[:1] + bshd[1:]}
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            for name, (q, k, v) in layouts.items():
                s = timed(lambda: F.scaled_dot_product_attention(q, k, v), 30, 5)
                o = F.scaled_dot_product_attention(q, k, v)
                emit(out, section="single_attention", kind=f"cudnn_{name}", seconds=s, tflops=flops / s / 1e12,
                     out_stride=list(o.stride()))


def vae(out: Path) -> None:
    model = full_size.flux_vae("cuda", torch.bfloat16)
    latents = torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        emit(out, section="vae", kind="eager", seconds=timed(lambda: model.decode(latents, return_dict=False), 5, 2))
        model = model.to(memory_format=torch.channels_last)
        emit(out, section="vae", kind="channels_last",
             seconds=timed(lambda: model.decode(latents, return_dict=False), 5, 2))
        model.decoder = torch.compile(model.decoder, fullgraph=True)
        first = once(lambda: model.decode(latents, return_dict=False))
        emit(out, section="vae", kind="compiled_channels_last", first_call=first,
             seconds=timed(lambda: model.decode(latents, return_dict=False), 5, 2))


def png(out: Path) -> None:
    import numpy as np
    from PIL import Image

    from qwen2vl_flux.client.cli import DEMO_INPUT

    # A picture, not the noise random weights paint: the demo scene upscaled, plus sensor-like noise.
    smooth = np.asarray(Image.open(DEMO_INPUT).convert("RGB").resize((1024, 1024), Image.LANCZOS), dtype=np.float32)
    noisy = smooth + np.random.default_rng(0).normal(0, 2.0, smooth.shape)
    picture = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    for fmt, kwargs in (("PNG", {"compress_level": 1}), ("PNG", {"compress_level": 6}), ("WEBP", {"quality": 90}),
                        ("WEBP", {"lossless": True, "method": 0}), ("JPEG", {"quality": 92})):
        def save():
            buf = io.BytesIO()
            picture.save(buf, format=fmt, **kwargs)
            return buf.tell()

        size = save()
        begin = time.perf_counter()
        for _ in range(5):
            save()
        emit(out, section="image_encode", kind=f"{fmt} {kwargs}", seconds=(time.perf_counter() - begin) / 5,
             bytes=size)
    from qwen2vl_flux.client.png import png_bytes

    for level in (1, 6):
        size = len(png_bytes(picture, level))
        begin = time.perf_counter()
        for _ in range(5):
            png_bytes(picture, level)
        emit(out, section="image_encode", kind=f"PNG level {level}, ours (client/png.py: strips on every CPU)",
             seconds=(time.perf_counter() - begin) / 5, bytes=size)
    begin = time.perf_counter()
    for _ in range(5):
        picture.tobytes()
    emit(out, section="image_encode", kind="raw RGB", seconds=(time.perf_counter() - begin) / 5,
         bytes=len(picture.tobytes()))
    # image_count 4: one call after another, or four at once as the generator makes them
    from concurrent.futures import ThreadPoolExecutor

    def png1(image) -> int:
        return len(png_bytes(image))

    pictures = [picture.rotate(90 * i) for i in range(4)]
    begin = time.perf_counter()
    list(map(png1, pictures))
    one_by_one = time.perf_counter() - begin
    with ThreadPoolExecutor(4) as pool:
        begin = time.perf_counter()
        list(pool.map(png1, pictures))
        threaded = time.perf_counter() - begin
    emit(out, section="image_encode", kind="4 x PNG level 1, ours", one_by_one=one_by_one, threads=threaded)


def torchao_fp8(out: Path) -> None:
    """Why torchao's fp8 start-up takes minutes: compile time and graphs of its subclass weights."""
    import torch._dynamo
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    from qwen2vl_flux.generator_server.fp8 import keeps_precision

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = full_size.flux_transformer("cuda", torch.bfloat16)
    model.context_embedder = torch.nn.Identity()
    model.set_attention_backend("_native_cudnn")
    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and not keeps_precision(name))
    model.compile_repeated_blocks(fullgraph=True)
    inputs = transformer_inputs()
    with torch.inference_mode():
        first = once(lambda: model(**inputs))
        s = timed(lambda: model(**inputs), 3, 1)
    emit(out, section="torchao", kind="fp8_row", seconds=s, first_call=first,
         frames=dict(torch._dynamo.utils.counters["stats"]))


def first_call_profile(fn) -> dict:
    """Profile a first call and the next one; the ops whose host time, and whose GPU time,
    grew the most."""
    def profiled():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            seconds = once(fn)
        return seconds, {e.key: (e.self_cpu_time_total, e.count, e.self_device_time_total)
                         for e in prof.key_averages()}
    first, ops_first = profiled()
    second, ops_next = profiled()

    def grown(index: int) -> list:
        rows = sorted(((ops_first[k][index] - ops_next.get(k, (0, 0, 0))[index]) / 1000, k, ops_first[k][1])
                      for k in ops_first)
        return [(k, round(ms, 2), n) for ms, k, n in rows[::-1][:12]]
    return {"first": first, "next": second, "grown_ms": grown(0), "gpu_grown_ms": grown(2)}


def shapes(out: Path, checkpoints: str) -> None:
    """What an eager model pays the first time it meets an image size: the encoder (Qwen2-VL)
    and the VAE's encoder, first call against the next ones at each size, and a profile of a first
    call at a patch count not seen before (which ops' host time grew). The encoder runs its text
    attention as it serves (no cuDNN), then with cuDNN's at other new counts, for comparison."""
    from PIL import Image
    from torch.nn.attention import SDPBackend

    from qwen2vl_flux.encoder_server import model as encoder_model

    encoder = encoder_model.Qwen2VLFluxEncoder(checkpoints, device="cuda", dtype=torch.bfloat16,
                                               random_weights="full")
    budget = 256 * 28 * 28

    def encode(size):
        picture = Image.new("RGB", size, (90, 140, 200))
        return lambda: encoder.encode_image("input", picture, None, budget)

    def sizes(attention: str, new: list, profiled: tuple) -> None:
        for size in new:
            calls = [once(encode(size)) for _ in range(4)]
            emit(out, section="shapes", model="encoder", attention=attention, size=size, first=calls[0],
                 next=calls[1:])
        emit(out, section="shapes", model="encoder", attention=attention, size=profiled,
             profile=first_call_profile(encode(profiled)))

    # Patch counts: 936, 988, 988 (transposed), 1008, 1008 (transposed); 952 profiled.
    sizes("served", [(1024, 768), (1000, 700), (700, 1000), (1280, 720), (640, 1136)], (537, 650))
    served = encoder_model.TEXT_ATTENTION
    encoder_model.TEXT_ATTENTION = [SDPBackend.CUDNN_ATTENTION]
    try:  # 968, 912, 920 patches
        sizes("cudnn", [(500, 950), (611, 950)], (1092, 500))
    finally:
        encoder_model.TEXT_ATTENTION = served
    sizes("served", [(1240, 500), (1055, 500)], (574, 650))  # 1000, 1012; 1020
    encoder = None   # frees its GPU memory for the VAE (the closures above hold the name)
    torch.cuda.empty_cache()
    vae = full_size.flux_vae("cuda", torch.bfloat16)
    with torch.inference_mode():
        for side in ((1024, 1024), (1008, 704), (704, 1008)):
            x = torch.randn(1, 3, side[1], side[0], device="cuda", dtype=torch.bfloat16)
            calls = [once(lambda: vae.encode(x).latent_dist.mode()) for _ in range(3)]
            emit(out, section="shapes", model="vae_encode", size=side, first=calls[0], next=calls[1:])
        x = torch.randn(1, 3, 880, 1200, device="cuda", dtype=torch.bfloat16)
        emit(out, section="shapes", model="vae_encode", size=(1200, 880),
             profile=first_call_profile(lambda: vae.encode(x).latent_dist.mode()))


def first_request(out: Path, checkpoints: str) -> None:
    """What the compiled generator pays for the first request at an image size or a text length
    it has not met (img2img at a new size, whose picture also changes the text length, is the
    restart table's closest case): its phases (prepare, denoise, decode) first and next, and a
    profile of each first call."""
    from PIL import Image

    from qwen2vl_flux.client.modes import Mode, resolve_parameters
    from qwen2vl_flux.generator_server.pipeline import Conditioning, FluxGenerator, GenerationJob, SpeedOptions

    generator = FluxGenerator(checkpoints, device="cuda", dtype=torch.bfloat16, random_weights="full")
    generator.optimize(SpeedOptions(compile=True, attention="_native_cudnn"))
    start = time.perf_counter()
    generator.warm_up([Mode.VARIATION, Mode.IMG2IMG, Mode.INPAINT])
    emit(out, section="first_request", warm_up=time.perf_counter() - start)
    cfg = generator.fingerprint

    def conditioning(text: int) -> Conditioning:
        return Conditioning({"a": torch.randn(1, text, cfg.joint_attention_dim, device="cuda", dtype=torch.bfloat16)},
                            None, torch.randn(1, cfg.pooled_dim, device="cuda", dtype=torch.bfloat16))
    # (mode, init image size, parameters, text tokens): the warm-up met 512 text tokens only
    cases = [("img2img", (1000, 700), {}, 512), ("img2img", (1000, 700), {}, 523), ("inpaint", (700, 1000), {}, 512),
             ("variation", None, {"aspect_ratio": "16:9"}, 512), ("variation", None, {"aspect_ratio": "1:1"}, 531),
             ("img2img", (1200, 880), {}, 547)]
    # A call at a shape the warm-up met, so that the first case pays only for what is new to it.
    seen, _ = resolve_parameters(Mode.IMG2IMG, {"seed": 0, "steps": 8, "strength": 1.0})
    generator.generate(GenerationJob(Mode.IMG2IMG, seen, conditioning(512),
                                     init_image=Image.new("RGB", (1024, 1024), (90, 140, 200))))
    for name, size, extra, text in cases:
        mode, cond = Mode.parse(name), conditioning(text)
        picture = Image.new("RGB", size or (1024, 1024), (90, 140, 200))
        params, _ = resolve_parameters(mode, {"seed": 0, "steps": 8, **({"strength": 1.0} if size else {}), **extra})
        jobs = []

        def run():
            job = GenerationJob(mode, params, cond, init_image=picture, mask=Image.new("L", picture.size, 255))
            generator.generate(job)
            jobs.append(job.timings)
        profile = first_call_profile(run)
        emit(out, section="first_request", mode=name, size=size or extra, text_tokens=text, **profile,
             phases={"first": jobs[0], "next": jobs[1]})


def served_steps(out: Path, checkpoints: str, variants: list[str], deadline: float) -> None:
    """A served request's steps against the lone transformer call (`kernels`): 28-step
    variations at 1024x1024 through `FluxGenerator.generate`, compiled as the generator serves,
    at 508 text tokens (the bench's request: the picture's 252 Qwen tokens and T5's 256) and, with
    `text512` among the variants, 512; without CUDA graphs and with them (the request that meets
    the shape, the one that captures it, then timed replays), timed with the SM clock and power
    sampled by nvidia-smi meanwhile (sustained load may lower the clock); with `profiled`, each
    profiled: the whole request's kernels by kind and the GPU's idle time. Variants: default,
    turbo, and those words joined by "+"."""
    import subprocess

    from qwen2vl_flux.client.modes import Mode, resolve_parameters
    from qwen2vl_flux.generator_server.pipeline import Conditioning, FluxGenerator, GenerationJob, SpeedOptions
    from qwen2vl_flux.generator_server.step_graphs import StepGraphs

    params, _ = resolve_parameters(Mode.VARIATION, {"seed": 0, "steps": 28})
    for variant in variants:
        if time.perf_counter() - START > deadline:
            emit(out, section="served_steps", kind=variant, skipped="budget")
            continue
        words = set(variant.split("+"))
        torch._dynamo.reset()
        generator = FluxGenerator(checkpoints, device="cuda", dtype=torch.bfloat16, random_weights="full")
        generator.optimize(SpeedOptions(compile=True, attention="_native_cudnn", turbo="turbo" in words))
        cfg = generator.fingerprint
        for text in (508, 512) if "text512" in words else (508,):
            cond = Conditioning({"a": torch.randn(1, text, cfg.joint_attention_dim, device="cuda",
                                                  dtype=torch.bfloat16)},
                                None, torch.randn(1, cfg.pooled_dim, device="cuda", dtype=torch.bfloat16))

            def run() -> dict:
                job = GenerationJob(Mode.VARIATION, params, cond)
                generator.generate(job)
                return job.timings
            for graphs in (False, True):
                generator.step_graphs = StepGraphs(8) if graphs else None
                row = dict(section="served_steps", variant=variant, text_tokens=text, cuda_graphs=graphs)
                emit(out, **row, kind="first", seconds=once(run))
                if graphs:
                    emit(out, **row, kind="capture", seconds=once(run), captures=generator.step_graphs.captures)
                sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,temperature.gpu",
                                            "--format=csv,noheader,nounits", "-lms", "100"],
                                           stdout=subprocess.PIPE, text=True)
                try:
                    timings = [run() for _ in range(3)]
                finally:
                    sampler.terminate()
                samples = [[float(v) for v in line.split(",")] for line in sampler.communicate()[0].splitlines()
                           if line.count(",") == 2]
                clocks = sorted(c for c, _, _ in samples)
                emit(out, **row, kind="timed", denoise=[round(t["denoise"], 3) for t in timings],
                     ms_per_step=round(1000 * sorted(t["denoise"] for t in timings)[1] / 28, 2),
                     decode=[round(t["decode"], 3) for t in timings],
                     sm_clock_mhz={"min": clocks[0], "median": clocks[len(clocks) // 2], "max": clocks[-1]}
                     if clocks else None, power_w_max=max((p for _, p, _ in samples), default=None))
                if "profiled" in words:
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        timing = run()
                    # the whole request: preparation and VAE decode included
                    name = f"trace-served-steps-{variant.replace('+', '_')}-{text}{'-graphs' if graphs else ''}.json"
                    summary = profiled_summary(prof, out / name)
                    emit(out, **row, kind="profiled", denoise_ms_per_step=round(1000 * timing["denoise"] / 28, 2),
                         **summary)
        generator = None
        torch.cuda.empty_cache()


def _generator_start(out: Path, name: str, checkpoints: str, *server_flags: str, python_flags: tuple = (),
                     sampled: bool = False) -> tuple[dict, str]:
    """Start a generator, wait for SERVING (or 240 s), stop it; its first log line of each kind,
    the seconds from spawn to the port bound, and the log. `sampled` runs it under
    bench/stack_sampler.py, whose samples land in OUT/NAME.jsonl.gz."""
    import subprocess
    import sys

    log = out / f"{name}.log"
    wrapper = [str(Path(__file__).with_name("stack_sampler.py")), str(out / f"{name}.jsonl.gz")] if sampled else []
    began = time.time()
    with log.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, *python_flags, *wrapper, "-m", "qwen2vl_flux.generator_server", "--checkpoints",
             checkpoints, "--random-weights", "full", "--device", "cuda:0", "--port", "0", *server_flags],
            stderr=err, stdout=subprocess.DEVNULL)
        events: dict = {}
        try:
            while "serving" not in events and process.poll() is None and time.time() - began < 240:
                time.sleep(0.2)
                for line in log.read_text(errors="replace").splitlines():
                    if line.startswith("{") and '"msg"' in line:
                        event = json.loads(line)
                        events.setdefault(event["msg"], event)
        finally:
            process.terminate()
            process.wait(60)
    text = log.read_text(errors="replace")
    marks = {"spawn_to_listening": events.get("listening", {}).get("ts", began) - began}
    if "serving" in events:
        marks["spawn_to_serving"] = events["serving"]["ts"] - began
    if "weights loaded" in events:
        weights = events["weights loaded"]
        marks["listening_to_weights_start"] = weights["ts"] - weights["seconds"] - events["listening"]["ts"]
        marks["weights"] = weights["seconds"]
    marks["phases"] = {k: v.get("seconds") for k, v in events.items() if "seconds" in v}
    return marks, text


def startup(out: Path, checkpoints: str) -> None:
    """Where a generator process's time goes before its weights: spawn to the port bound
    ("listening"), then to the start of the weights (the imports phase included), with Python's
    import times summed by top-level package (-X importtime, a second start so that its overhead
    does not count in the first)."""
    import re

    marks, _ = _generator_start(out, "startup", checkpoints, "--no-compile")
    emit(out, section="startup", run="plain", **marks)
    marks, text = _generator_start(out, "startup-importtime", checkpoints, "--no-compile",
                                   python_flags=("-X", "importtime"))
    by_package: dict[str, float] = {}
    for self_us, name in re.findall(r"import time:\s+(\d+) \|\s+\d+ \|\s*([\w.]+)", text):
        top = name.split(".")[0]
        by_package[top] = by_package.get(top, 0.0) + int(self_us) / 1e6
    top = dict(sorted(by_package.items(), key=lambda kv: -kv[1])[:12])
    emit(out, section="startup", run="importtime", **marks, imports_total=sum(by_package.values()),
         imports_by_package={k: round(v, 2) for k, v in top.items()})


def restart(out: Path, checkpoints: str) -> None:
    """A compiled generator's warm start: one cold start fills a compile cache, then one warm start
    as it is and one under the stack sampler (OUT/restart-warm-sampled.jsonl.gz; it slows the start)."""
    import shutil

    cache = Path("/tmp/probe-restart-cache")
    shutil.rmtree(cache, ignore_errors=True)
    flags = ("--compile", "--compile-cache", str(cache))
    marks, _ = _generator_start(out, "restart-cold", checkpoints, *flags)
    emit(out, section="restart", run="cold", **marks)
    for name, sampled in (("restart-warm", False), ("restart-warm-sampled", True)):
        marks, _ = _generator_start(out, name, checkpoints, *flags, sampled=sampled)
        emit(out, section="restart", run=name, **marks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--sections", default="peak,attention,png,vae,step,torchao")
    parser.add_argument("--variants", default="eager,regional,fused_qkv,fp8_tensor,fp8_row,flags")
    parser.add_argument("--kernel-variants", default="default,turbo,fused,autotune")
    parser.add_argument("--served-variants", default="default,turbo")
    parser.add_argument("--budget", type=float, default=540)
    parser.add_argument("--checkpoints", default="/tmp/tiny", help="tokenizers and configs (section shapes)")
    parser.add_argument("--output-code", action="store_true", help="Inductor's generated code on stderr")
    args = parser.parse_args()
    if args.output_code:
        torch._logging.set_logs(output_code=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit(out, section="env", gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    for section in args.sections.split(","):
        if time.perf_counter() - START > args.budget:
            emit(out, section=section, skipped="budget")
            continue
        try:
            if section in ("shapes", "startup", "restart", "first_request"):
                {"shapes": shapes, "startup": startup, "restart": restart,
                 "first_request": first_request}[section](out, args.checkpoints)
            elif section == "served_steps":
                served_steps(out, args.checkpoints, args.served_variants.split(","), args.budget)
            elif section == "step":
                step(out, args.budget, args.variants.split(","))
            elif section == "kernels":
                kernels(out, args.checkpoints, args.kernel_variants.split(","), args.budget)
            else:
                {"peak": peak, "gemm": gemm, "single_mlp": single_mlp, "fp8_gelu_rows": fp8_gelu_rows, "single_attention": single_attention,
                 "attention": attention, "vae": vae, "png": png, "torchao": torchao_fp8}[section](out)
        except Exception as e:  # noqa: BLE001
            emit(out, section=section, error=f"{type(e).__name__}: {e}"[:500])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
