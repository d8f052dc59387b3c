"""Matmul FLOPs of one FLUX transformer call, from its configuration: what MFU is measured against.

A double-stream block runs its image-stream Linears on the image tokens only and its text-stream
Linears on the text tokens only, so together they see every token once; counting both streams at
every token (as this bench did before 2026-12-07) put one FLUX.1-dev step at 94.2 TFLOP instead of
74.4. Modulation and embedding Linears see one row per image. No torch: bench/run.py reads it.
"""
from __future__ import annotations

FLUX_DEV = dict(num_layers=19, num_single_layers=38, num_attention_heads=24, attention_head_dim=128,
                in_channels=64, pooled_projection_dim=768, guidance_embeds=True)


def transformer_step_flops(config: dict, image_tokens: int, text_tokens: int, batch: int = 1) -> dict:
    """{"linears", "attention", "total"} in FLOPs for one call (context_embedder excluded: the
    generator applies it once a request, outside the steps)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    mlp = 4 * d
    tokens = image_tokens + text_tokens
    double, single = config["num_layers"], config["num_single_layers"]
    per_token = double * (4 * d * d + 2 * d * mlp) + single * (3 * d * d + d * mlp + (d + mlp) * d)
    rows = double * (2 * d * 6 * d) + single * d * 3 * d + d * 2 * d          # AdaLN modulation, norm_out
    embeds = (256 * d + d * d) + (config["pooled_projection_dim"] * d + d * d)      # timestep, pooled text
    if config.get("guidance_embeds"):
        embeds += 256 * d + d * d
    image_io = 2 * config["in_channels"] * d * image_tokens                   # x_embedder, proj_out
    linears = 2 * batch * (per_token * tokens + rows + embeds + image_io)
    attention = batch * (double + single) * 4 * tokens * tokens * d
    return {"linears": linears, "attention": attention, "total": linears + attention}
