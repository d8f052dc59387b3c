"""Image difference of each lossy speed option from the lossless path, on the trained demo
model (CPU is enough; fp32 weights, fp8 Linear layers through torch._scaled_mm, arranged as the
compiled path arranges turbo's blocks: generator_server/blocks.py).

  python bench/quality.py [--checkpoints checkpoints/demo] [--seeds 1,2,3] [--size 128]

Prints a Markdown table: for each option, the steps it skips out of 28 and PSNR / max abs
difference against the lossless image of the same seed (uint8 RGB). On the demo model this is
image quality; on the random full-size weights of bench/run.py it measures numeric drift only.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qwen2vl_flux.client.cli import DEMO_INPUT
from qwen2vl_flux.client.modes import Mode, resolve_parameters
from qwen2vl_flux.encoder_server.model import Qwen2VLFluxEncoder
from qwen2vl_flux.generator_server import blocks
from qwen2vl_flux.generator_server.pipeline import (Conditioning, FluxGenerator, GenerationJob, SpeedOptions,
                                                    StepCache)

STEPS = 28
OPTIONS = {
    "step cache fixed:2": SpeedOptions(step_cache=StepCache(interval=2)),
    "step cache fixed:3": SpeedOptions(step_cache=StepCache(interval=3)),
    "turbo (fp8)": SpeedOptions(turbo=True),
    "turbo + step cache fixed:3": SpeedOptions(turbo=True, step_cache=StepCache(interval=3)),
    "step cache fixed:4": SpeedOptions(step_cache=StepCache(interval=4)),
    "turbo + step cache fixed:4": SpeedOptions(turbo=True, step_cache=StepCache(interval=4)),
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints", default=str(Path(__file__).resolve().parents[1] / "checkpoints" / "demo"))
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    encoder = Qwen2VLFluxEncoder(args.checkpoints)
    picture = Image.open(DEMO_INPUT).convert("RGB")
    encodings, _ = encoder.encode_parts([("a", picture, None)], None, 512 * 28 * 28)
    cond = Conditioning({"a": encodings[0].tokens}, None, encoder.pooled)

    def images(generator: FluxGenerator) -> list[np.ndarray]:
        out = []
        for seed in map(int, args.seeds.split(",")):
            params, _ = resolve_parameters(Mode.VARIATION, {"seed": seed, "steps": STEPS, "width": args.size,
                                                            "height": args.size})
            out.append(np.asarray(generator.generate(GenerationJob(Mode.VARIATION, params, cond))[0]))
        return out

    reference = images(FluxGenerator(args.checkpoints))
    print("| option | steps run of 28 | PSNR vs lossless (dB), mean over seeds | max abs difference |")
    print("|---|---|---|---|")
    for name, options in OPTIONS.items():
        generator = FluxGenerator(args.checkpoints)
        generator.optimize(options)
        if options.turbo:   # the fp8 blocks as the compiled path arranges them (eager here)
            blocks.fuse_products(generator.transformer)
            blocks.strided_attention(generator.transformer)
        got = images(generator)
        skipped = len(options.step_cache.skipped(STEPS)) if options.step_cache else 0
        scores = [psnr(a, b) for a, b in zip(got, reference)]
        worst = max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(got, reference))
        print(f"| {name} | {STEPS - skipped} | {sum(scores) / len(scores):.1f} | {worst} |", flush=True)


if __name__ == "__main__":
    main()
