"""A Llama decoder layer at batch-1 decode, with each input norm folded into the matmul
after it (kernels/triton/norm_gemv.py), five launches fewer a layer:

    plain  [add+norm] [qkv] [rotary] [write_kv] [attention] [o]
           [add+norm] [gate_up] [silu*up] [down]
    fused  [add+norm+qkv+rotary+write_kv] [attention] [o]
           [add+norm+gate_up+silu*up] [down]

Same function, same rounding points (the norm's scale aside: see norm_gemv.py). Each half
fuses where its layers allow it (`attention_fusable`, `mlp_fusable`: unquantized weights,
no per-head q/k norm, the Triton attention backend, a dense MLP) and runs plainly where
not; a call fuses at all only for one half-precision row on CUDA (`applies`) and with
TANDEM_DECODE_FUSION=1. The runner captures this path in its batch-1 CUDA graph.

Off by default: on the H200 (Llama-3.1-8B shapes, bf16) it measured 4.42 ms/token against
the plain path's 4.18. The fused GEMVs at their default tile cost more than the kernels they
replace (docs/decode.md has the per-kernel breakdown and what to try next).
"""

from __future__ import annotations

import torch
from torch import nn

from tandem import envs
from tandem.kernels import ops
from tandem.layers.attention_metadata import AttentionMetadata
from tandem.layers.linear_method import UnquantizedLinearMethod


def attention_fusable(layer: nn.Module) -> bool:
    attn = layer.self_attn
    return (isinstance(attn.qkv_proj.method, UnquantizedLinearMethod)
            and not hasattr(attn, "q_norm") and attn.attn.backend.name == "triton"
            and not attn.attn.fp8_attention)


def mlp_fusable(layer: nn.Module) -> bool:
    gate_up = getattr(layer.mlp, "gate_up_proj", None)
    return gate_up is not None and isinstance(gate_up.method, UnquantizedLinearMethod)


def _fuse_attention(layer: nn.Module, hidden: torch.Tensor) -> bool:
    return (attention_fusable(layer)
            and ops.norm_gemv_supported(hidden, layer.self_attn.qkv_proj.weight))


def _fuse_mlp(layer: nn.Module, hidden: torch.Tensor) -> bool:
    return mlp_fusable(layer) and ops.norm_gemv_supported(hidden, layer.mlp.gate_up_proj.weight)


def applies(layer: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether `layer.forward(positions, hidden, ...)` takes the fused path."""
    return (isinstance(hidden, torch.Tensor) and hidden.shape[0] == 1 and hidden.is_cuda and envs.decode_fusion_enabled()
            and (_fuse_attention(layer, hidden) or _fuse_mlp(layer, hidden)))


def _norm(norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is None:
        return norm(hidden), hidden
    return norm(hidden, residual)


def decoder_layer(layer: nn.Module, positions: torch.Tensor, hidden: torch.Tensor,
                  residual: torch.Tensor | None, meta: AttentionMetadata
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaDecoderLayer.forward for one token: (hidden, residual) -> (hidden, residual)."""
    attn, mlp = layer.self_attn, layer.mlp
    fuse_mlp = _fuse_mlp(layer, hidden)
    if _fuse_attention(layer, hidden):
        norm, qkv_proj, rope = layer.input_layernorm, attn.qkv_proj, attn.rotary_emb
        qkv, residual = ops.norm_qkv_rotary_kv(
            hidden, residual, norm.weight, norm.eps, qkv_proj.weight, qkv_proj.bias,
            positions, rope.cos_cache, rope.sin_cache, attn.attn.kv_cache, meta.slot_mapping,
            attn.attn.kv_scale, attn.num_heads, attn.num_kv_heads)
        hidden = attn.o_proj(attn.attn.attend(qkv[:, :qkv_proj.q_size], meta))
    else:
        hidden, residual = _norm(layer.input_layernorm, hidden, residual)
        hidden = attn(positions, hidden, meta)
    norm = layer.post_attention_layernorm
    if fuse_mlp:
        gate_up = mlp.gate_up_proj
        act, residual = ops.norm_gate_up_silu(hidden, residual, norm.weight, norm.eps,
                                              gate_up.weight, gate_up.bias)
        return mlp.down_proj(act), residual
    hidden, residual = norm(hidden, residual)
    return mlp(hidden), residual
