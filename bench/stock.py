"""Rows (a), (a_compile), (a_fp8) of the benchmark: stock transformers + diffusers in one
process on one GPU.

What a user of the original scripts runs: Qwen2-VL, T5 and CLIP encode, then stock
FluxPipeline (default attention) denoises and decodes, then the PNG is written. --variant
compile adds `compile_repeated_blocks`; fp8 also quantises the transformer with torchao
(fp8 dynamic activations and weights, row-wise), the maintained stock route. Full-size
architectures with random weights (the same builders the servers use), bf16. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from qwen2vl_flux.checkpoints import full_size

STEPS, SIZE, PROMPT = 28, 1024, "a photo of a red circle on a blue background"
START = time.perf_counter()


def phase(text: str) -> None:
    """A progress line on stderr (bench/run.py keeps it in the row's log)."""
    print(f"phase {text} at {time.perf_counter() - START:.1f} s", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints", required=True, help="tokenizers and configs (the tiny preset)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--variant", choices=["eager", "compile", "fp8"], default="eager")
    parser.add_argument("--sample", help="write the image of --sample-seed here")
    parser.add_argument("--sample-seed", type=int, default=7)
    args = parser.parse_args()

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    device, dtype, root = torch.device(args.device), torch.bfloat16, Path(args.checkpoints)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(root / "qwen2-vl")
    processor = Qwen2VLImageProcessorPil.from_pretrained(root / "qwen2-vl")
    t5_tokenizer = AutoTokenizer.from_pretrained(root / "flux" / "tokenizer_2")
    clip_tokenizer = AutoTokenizer.from_pretrained(root / "flux" / "tokenizer")
    special = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
               "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
               "bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>"}
    qwen = full_size.qwen2_vl(device, dtype, {k: tokenizer.convert_tokens_to_ids(v) for k, v in special.items()})
    t5 = full_size.t5_encoder(device, dtype)
    clip = full_size.clip_text(device, dtype, clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id)
    connector = full_size.linear(device, dtype, full_size.CONNECTOR, 1)
    t5_embedder = full_size.linear(device, dtype, full_size.T5_EMBEDDER, 2)
    transformer = full_size.flux_transformer(device, dtype)
    context_embedder, transformer.context_embedder = transformer.context_embedder, torch.nn.Identity()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "flux" / "scheduler")
    pipe = FluxPipeline(scheduler=scheduler, vae=full_size.flux_vae(device, dtype), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    phase("weights built")
    if args.variant == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        from qwen2vl_flux.generator_server.fp8 import keeps_precision

        quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and not keeps_precision(name))
    if args.variant in ("compile", "fp8"):
        transformer.compile_repeated_blocks(fullgraph=True)
    build_seconds = time.perf_counter() - start
    phase(f"{args.variant} set up")
    template = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        tokenize=False, add_generation_prompt=True)
    picture = Image.new("RGB", (1024, 768), (90, 140, 200))

    def step_done(pipeline, step: int, timestep, kwargs: dict) -> dict:
        phase(f"first request: step {step} done")
        return kwargs

    @torch.inference_mode()
    def request(seed: int, sample: str | None = None, first: bool = False) -> dict:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        budget = 256 * 28 * 28
        feats = processor(images=[picture], size={"shortest_edge": budget, "longest_edge": budget},
                          return_tensors="pt")
        grid = feats["image_grid_thw"]
        text = template.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // 4), 1)
        ids = tokenizer(text, return_tensors="pt").input_ids.to(device)
        is_image = ids == qwen.config.image_token_id
        hidden = qwen(input_ids=ids, attention_mask=torch.ones_like(ids),
                      pixel_values=feats["pixel_values"].to(device, dtype), image_grid_thw=grid.to(device),
                      mm_token_type_ids=is_image.int(), use_cache=False).last_hidden_state
        qwen_tokens = context_embedder(connector(hidden[is_image].unsqueeze(0)))
        t5_ids = t5_tokenizer([PROMPT], padding="max_length", max_length=256, truncation=True,
                              return_tensors="pt").input_ids.to(device)
        prompt_embeds = torch.cat([qwen_tokens, t5_embedder(t5(t5_ids).last_hidden_state)], dim=1)
        clip_ids = clip_tokenizer([""], padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids.to(device)
        pooled = clip(clip_ids).pooler_output
        torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        image = pipe(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, num_inference_steps=STEPS,
                     guidance_scale=3.5, height=SIZE, width=SIZE,
                     generator=torch.Generator().manual_seed(seed),
                     callback_on_step_end=step_done if first else None).images[0]
        t2 = time.perf_counter()
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        t3 = time.perf_counter()
        if sample:
            image.save(sample, compress_level=1)
        return {"total": t3 - t0, "encode": t1 - t0, "pipeline": t2 - t1, "png": t3 - t2}

    first = request(0, first=True)
    phase(f"first request (warm-up, compiles) {first['total']:.1f} s")
    runs = []
    for i in range(args.runs):
        runs.append(request(i + 1))
        phase(f"request {i + 1} {runs[-1]['total']:.2f} s")
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    if args.sample:
        request(args.sample_seed, args.sample)
    row = {"eager": "a", "compile": "a_compile", "fp8": "a_fp8"}[args.variant]
    print(json.dumps({"row": row, "first": first["total"], "warm_up_seconds": first["total"], "median": median,
                      "build_seconds": build_seconds, "peak_gpu_bytes": torch.cuda.max_memory_allocated(device)}))


if __name__ == "__main__":
    main()
