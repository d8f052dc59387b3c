"""FLUX blocks as the compiled generator runs them: diffusers' blocks and their math, arranged
so that every block of a class shares one compiled graph and fewer passes go over memory.

- Single blocks see their tokens in one joint layout (`share_single_block_graphs`).
- The tanh GELU after a bf16 or fp16 Linear runs in cuBLASLt's epilogue on the GPU
  (`LinearGeluTanh`): the GEMM writes the activation, and no kernel reads and writes the
  4608 x 12288 hidden states again. The GELU then sees the fp32 accumulator, not its bf16
  rounding. fp32 layers keep the stock GELU: the epilogue's is 2.7 x further from float64 than
  torch's in fp32 (tests/test_gpu.py), which bf16's rounding hides and fp32's would not.
- A single block's proj_out takes the attention output and the MLP's hidden states as two
  products summed (`ConcatFreeLinear`), not as one product of their concatenation, which was a
  copy of 141 MB a block.
Both change the rounding, not the math (bf16 noise; BENCHMARKS.md reports the image difference);
turbo's fp8 layers keep diffusers' arrangement.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F


class LinearGeluTanh(torch.nn.Module):
    """gelu(x W^T + b, approximate="tanh"), diffusers' GELU module or a Linear followed by one."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        # cuBLASLt's GELU epilogue is the tanh form (the CPU's would be the exact one)
        if rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16):
            out = torch._addmm_activation(self.linear.bias, rows, self.linear.weight.t(), use_gelu=True)
        else:
            out = F.gelu(F.linear(rows, self.linear.weight, self.linear.bias), approximate="tanh")
        return out.reshape(*x.shape[:-1], out.shape[-1])


class ConcatFreeLinear(torch.nn.Module):
    """A Linear over cat([a, b], -1), computed as a W_a^T + b W_b^T + bias from column views of
    its weight (no copy of the weight, none of the inputs)."""

    def __init__(self, linear: torch.nn.Linear, split: int):
        super().__init__()
        self.linear, self.split = linear, split

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        weight = self.linear.weight
        out = torch.addmm(self.linear.bias, a.reshape(-1, a.shape[-1]), weight[:, :self.split].t())
        out = torch.addmm(out, b.reshape(-1, b.shape[-1]), weight[:, self.split:].t())
        return out.reshape(*a.shape[:-1], out.shape[-1])


def repeated_blocks(model) -> list:
    """The double-stream then single-stream blocks of a FLUX transformer or ControlNet."""
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def joint_views(text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and image tokens as views of one joint tensor (text first): the layout a
    single-stream block returns. Inputs already in it pass through; others are copied."""
    joint_stride = ((text.shape[1] + image.shape[1]) * text.shape[2], text.shape[2], 1)
    if text.stride() == image.stride() == joint_stride:
        return text, image
    joint = torch.cat([text, image], dim=1)
    return joint[:, :text.shape[1]], joint[:, text.shape[1]:]


def share_single_block_graphs(model) -> None:
    """One compiled graph for all single-stream blocks of a batch size, not three.

    Dynamo guards on input strides: the first single block receives contiguous tensors from
    the last double block, later ones views of the previous block's joint output, and with
    the ControlNet's residual added the image part is contiguous again; each layout traced
    its own graph (seconds of every start, cache hit or not). Handing every block the joint
    view layout before its compiled call costs one copy of the tokens where the layout
    differs (once a step without a ControlNet) and changes no value."""
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    for block in model.single_transformer_blocks:
        if type(block) is FluxSingleTransformerBlock:
            block.__class__ = _single_block_in_joint_layout()


def _plain_linear(module) -> bool:
    return type(module) is torch.nn.Linear and module.bias is not None


def fuse_products(model) -> None:
    """The GELU epilogues and the concatenation-free proj_out in every block of `model` whose
    layers are bf16 or fp32 Linears (not turbo's fp8 ones). Single blocks take the joint layout
    first: only its forward hands proj_out its two inputs apart."""
    from diffusers.models.activations import GELU

    share_single_block_graphs(model)
    for block in model.transformer_blocks:
        for ff in (block.ff, block.ff_context):
            up = ff.net[0]
            if type(up) is GELU and up.approximate == "tanh" and _plain_linear(up.proj):
                ff.net[0] = LinearGeluTanh(up.proj)
    for block in model.single_transformer_blocks:
        if isinstance(block, _single_block_in_joint_layout()) and _plain_linear(block.proj_mlp) \
                and _plain_linear(block.proj_out) and block.act_mlp.approximate == "tanh":
            block.proj_mlp, block.act_mlp = LinearGeluTanh(block.proj_mlp), torch.nn.Identity()
            block.proj_out = ConcatFreeLinear(block.proj_out, block.proj_out.in_features - block.mlp_hidden_dim)


@functools.cache
def _single_block_in_joint_layout() -> type:
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    class _SingleBlockInJointLayout(FluxSingleTransformerBlock):
        # __call__ runs outside the compiled region (torch.compile wraps _call_impl).
        def __call__(self, hidden_states, encoder_hidden_states, *args, **kwargs):
            encoder_hidden_states, hidden_states = joint_views(encoder_hidden_states, hidden_states)
            return super().__call__(hidden_states, encoder_hidden_states, *args, **kwargs)

        def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                    joint_attention_kwargs=None):
            """diffusers' forward, with proj_out given its two inputs apart when it can take them."""
            text_seq_len = encoder_hidden_states.shape[1]
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

            residual = hidden_states
            norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
            mlp_hidden_states = self.act_mlp(self.proj_mlp(norm_hidden_states))
            attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                                    **(joint_attention_kwargs or {}))
            if isinstance(self.proj_out, ConcatFreeLinear):
                projected = self.proj_out(attn_output, mlp_hidden_states)
            else:
                projected = self.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))
            hidden_states = residual + gate.unsqueeze(1) * projected
            if hidden_states.dtype == torch.float16:
                hidden_states = hidden_states.clip(-65504, 65504)
            return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]

    try:   # diffusers' step caches look blocks up by class
        from diffusers.hooks._helpers import TransformerBlockRegistry
        TransformerBlockRegistry.register(_SingleBlockInJointLayout,
                                          copy.copy(TransformerBlockRegistry.get(FluxSingleTransformerBlock)))
    except (ImportError, ValueError):
        pass
    return _SingleBlockInJointLayout
