"""FLUX blocks as the compiled generator runs them: diffusers' blocks and their math, arranged
so that every block of a class shares one compiled graph and fewer passes go over memory.

- Single blocks see their tokens in one joint layout (`share_single_block_graphs`).
- The tanh GELU after a bf16 or fp16 Linear runs in cuBLASLt's epilogue on the GPU
  (`LinearGeluTanh`): the GEMM writes the activation, and no kernel reads and writes the
  4608 x 12288 hidden states again. The GELU then sees the fp32 accumulator, not its bf16
  rounding. fp32 layers keep torch's GELU: in fp32 the epilogue's was 2.7 x further from
  float64 than torch's (BENCHMARKS.md), which bf16's rounding hides and fp32's would not.
- A single block's proj_out takes the attention output and the MLP's hidden states as two
  products summed (`ConcatFreeLinear`), not as one product of their concatenation, which was a
  copy of 141 MB a block; turbo's fp8 one as two fp8 products (`ConcatFreeFp8Linear`), each part
  quantized with its own rows' range.
- turbo's fp8 products that read one input are one product (`stack_inputs`), and its MLPs'
  down-projections take the GELU's input: one kernel evaluates the GELU and quantizes it
  (`fold_gelu`, fp8.Fp8LinearOfGelu).
- Attention takes Q, K and V in the layouts Inductor gives them (`StridedAttnProcessor`): the
  same values, fewer copies.

The two fused products change the rounding, not the math (bf16 noise; BENCHMARKS.md reports the
image difference).
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F

from .fp8 import Fp8Linear, Fp8LinearOfGelu


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


class ConcatFreeFp8Linear(torch.nn.Module):
    """turbo's fp8 Linear over cat([a, b], -1) as two fp8 products summed
    (`Fp8Linear.split_columns`): each part quantized with its own rows' range, finer than the
    concatenation's."""

    def __init__(self, linear: Fp8Linear, split: int):
        super().__init__()
        self.first, self.second = linear.split_columns(split)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.first(a) + self.second(b)


class StridedAttnProcessor:
    """diffusers' FluxAttnProcessor without its layout copies; the same ops on the same values.

    diffusers' attention backends take (B, S, H, D) and its cuDNN one hands SDPA contiguous
    (B, H, S, D) copies, so a single block's V was copied (its Q and K are rewritten by the norm
    and RoPE anyway) and every block's output came back (B, H, S, D), to be copied again for the
    projection after it: at 4608 tokens on an H100, 17 us for V and 15 us for the output, 95
    kernels a step. SDPA takes strided inputs and writes its output in Q's layout, which Inductor
    then chooses to suit both sides. Q and K turn to (B, H, S, D) right after their norm, so that
    the RoPE kernel writes them as attention reads them. Installed for diffusers' backends that
    are torch's SDPA (native, _native_cudnn, ...). A call with a mask or context parallelism, or
    after the backend was reset or set to one that is not torch's SDPA, goes to diffusers'
    processor, as far as the call is traced or eager: a precompiled block graph (precompiled.py)
    keeps the path it was compiled with, like everything else it assumes."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 projections=None):
        """`projections`: a single block's Q, K and V computed already (`stack_inputs`); the
        fallback to diffusers' processor computes them again from the layers (views of the
        stacked weight), so the values stay the same."""
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections

        backend = _sdpa_backend(self._attention_backend)
        if attention_mask is not None or self._parallel_config is not None or backend is False:
            fallback = FluxAttnProcessor()
            fallback._attention_backend, fallback._parallel_config = self._attention_backend, self._parallel_config
            return fallback(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if projections is not None and encoder_hidden_states is None:
            (query, key, value), encoder_query, encoder_key, encoder_value = projections, None, None, None
        else:
            query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
                attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (t.unflatten(-1, (-1, attn.head_dim))
                                                         for t in (encoder_query, encoder_key, encoder_value))
            query = torch.cat([attn.norm_added_q(encoder_query), query], dim=1)
            key = torch.cat([attn.norm_added_k(encoder_key), key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=2)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=2)
        if backend is None:
            out = F.scaled_dot_product_attention(query, key, value)
        else:
            with torch.nn.attention.sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(query, key, value)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())


_SDPBackend = torch.nn.attention.SDPBackend
_SDPA_BACKENDS = {"native": None, "_native_cudnn": _SDPBackend.CUDNN_ATTENTION,
                  "_native_flash": _SDPBackend.FLASH_ATTENTION, "_native_efficient": _SDPBackend.EFFICIENT_ATTENTION,
                  "_native_math": _SDPBackend.MATH}


def _sdpa_backend(backend):
    """The SDPA backend a diffusers attention backend stands for: None for torch's own choice
    (diffusers' "native"), False for a backend that is not torch's SDPA or for none (after
    `reset_attention_backend`, diffusers' processor follows the active backend)."""
    return _SDPA_BACKENDS.get(getattr(backend, "value", backend), False)


def strided_attention(model) -> None:
    """StridedAttnProcessor in every block of `model` that runs diffusers' FluxAttnProcessor on
    one of torch's SDPA backends (the attention backend set first)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    default = _AttentionBackendRegistry.get_active_backend()[0]   # what a processor with no backend uses
    for block in repeated_blocks(model):
        processor = block.attn.processor
        if type(processor) is not FluxAttnProcessor:
            continue
        backend = processor._attention_backend or default
        if _sdpa_backend(backend) is not False:
            strided = StridedAttnProcessor()
            strided._attention_backend, strided._parallel_config = backend, processor._parallel_config
            block.attn.set_processor(strided)


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
    """The GELU epilogues where a block's layers are bf16 or fp32 Linears, the
    concatenation-free proj_out for those and turbo's fp8 ones, and turbo's products of one
    input stacked. Single blocks take the joint layout first: only its forward hands proj_out
    its two inputs apart."""
    from diffusers.models.activations import GELU

    share_single_block_graphs(model)
    for block in model.transformer_blocks:
        for ff in (block.ff, block.ff_context):
            up = ff.net[0]
            if type(up) is GELU and up.approximate == "tanh" and _plain_linear(up.proj):
                ff.net[0] = LinearGeluTanh(up.proj)
        stack_inputs(block)
        fold_gelu(block)
    for block in model.single_transformer_blocks:
        if not isinstance(block, _single_block_in_joint_layout()):
            continue
        if _plain_linear(block.proj_mlp) and _plain_linear(block.proj_out) and block.act_mlp.approximate == "tanh":
            block.proj_mlp, block.act_mlp = LinearGeluTanh(block.proj_mlp), torch.nn.Identity()
            block.proj_out = ConcatFreeLinear(block.proj_out, block.proj_out.in_features - block.mlp_hidden_dim)
        elif type(block.proj_out) is Fp8Linear:
            block.proj_out = ConcatFreeFp8Linear(block.proj_out, block.proj_out.in_features - block.mlp_hidden_dim)
            stack_inputs(block)
            fold_gelu(block)


def stack_inputs(block) -> None:
    """turbo's fp8 products that share an input as one (`Fp8Linear.stacked`): the input
    quantized once and one wide product of the same weights. A double block's Q, K and V of
    each stream (diffusers' fused projections), a single block's Q, K, V and MLP (`proj_in`)."""
    attn = block.attn
    qkv = [attn.to_q, attn.to_k, attn.to_v]
    if attn.fused_projections or hasattr(block, "proj_in") or not all(_row_fp8(layer) for layer in qkv):
        return
    if attn.added_kv_proj_dim is not None:
        added = [attn.add_q_proj, attn.add_k_proj, attn.add_v_proj]
        if all(_row_fp8(layer) for layer in added):
            attn.to_qkv, attn.to_added_qkv = Fp8Linear.stacked(qkv), Fp8Linear.stacked(added)
            attn.fused_projections = True
    elif _row_fp8(block.proj_mlp):
        block.proj_in = Fp8Linear.stacked(qkv + [block.proj_mlp])


def fold_gelu(block) -> None:
    """turbo's tanh GELUs before a row-scaled fp8 product evaluated by that product's
    quantization (fp8.Fp8LinearOfGelu): a double block's two MLPs, a single block's MLP half of
    its proj_out (which then takes the MLP's input to the GELU)."""
    from diffusers.models.activations import GELU

    if hasattr(block, "ff"):
        for ff in (block.ff, block.ff_context):
            up, down = ff.net[0], ff.net[2]
            if type(up) is GELU and up.approximate == "tanh" and type(up.proj) is Fp8Linear and _row_fp8(down):
                ff.net[0], ff.net[2] = up.proj, Fp8LinearOfGelu(down)
    elif (type(block.act_mlp) is torch.nn.GELU and block.act_mlp.approximate == "tanh"
          and type(block.proj_out) is ConcatFreeFp8Linear and _row_fp8(block.proj_out.second)):
        block.act_mlp, block.proj_out.second = torch.nn.Identity(), Fp8LinearOfGelu(block.proj_out.second)


def _row_fp8(layer) -> bool:
    return type(layer) is Fp8Linear and layer.granularity == "row"


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
            kwargs = joint_attention_kwargs or {}
            if getattr(self, "proj_in", None) is not None and isinstance(self.attn.processor, StridedAttnProcessor):
                inner = self.attn.inner_dim
                *projections, mlp = self.proj_in(norm_hidden_states).split_with_sizes(
                    [inner, inner, inner, self.mlp_hidden_dim], dim=-1)
                kwargs = dict(kwargs, projections=projections)
            else:
                mlp = self.proj_mlp(norm_hidden_states)
            mlp_hidden_states = self.act_mlp(mlp)
            attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **kwargs)
            if isinstance(self.proj_out, (ConcatFreeLinear, ConcatFreeFp8Linear)):
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
