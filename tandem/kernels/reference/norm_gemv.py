"""The fused decode matmuls (kernels/triton/norm_gemv.py) as the ops they replace, composed:
the spec of the fused kernels, and what runs where they do not (CPU, several rows).

    norm_qkv_rotary_kv   [add +] rms_norm -> linear -> rotary(q, k) -> write_kv(k, v)
    norm_gate_up_silu    [add +] rms_norm -> linear -> silu_and_mul
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.kernels.reference.attention import write_kv
from tandem.kernels.reference.elementwise import (fused_add_rms_norm, rms_norm, rotary,
                                                  silu_and_mul)


def _norm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new residual) as the decoder layer's input norm: no add for the first."""
    if residual is None:
        return rms_norm(x, norm_weight, eps), x
    return fused_add_rms_norm(x, residual, norm_weight, eps)


def norm_qkv_rotary_kv(x: torch.Tensor, residual: torch.Tensor | None,
                       norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                       bias: torch.Tensor | None, positions: torch.Tensor,
                       cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                       kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       kv_scale: tuple[float, float], num_heads: int, num_kv_heads: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (T, K) -> (qkv (T, (H + 2 Hkv) D) with q and k rotated, new residual);
    K and V written into kv_cache at slot_mapping."""
    hidden, residual = _norm(x, residual, norm_weight, eps)
    qkv = F.linear(hidden, weight, bias)
    t, d = qkv.shape[0], cos_cache.shape[-1]
    q, k, v = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q, k = rotary(positions, q.reshape(t, num_heads, d), k.reshape(t, num_kv_heads, d),
                  cos_cache, sin_cache)
    write_kv(k, v.reshape(t, num_kv_heads, d), kv_cache, slot_mapping, kv_scale)
    return torch.cat([q.reshape(t, -1), k.reshape(t, -1), v], dim=-1), residual


def norm_gate_up_silu(x: torch.Tensor, residual: torch.Tensor | None,
                      norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: (T, K) -> (silu(gate) * up (T, I), new residual); weight | gate | up |."""
    hidden, residual = _norm(x, residual, norm_weight, eps)
    return silu_and_mul(F.linear(hidden, weight, bias)), residual
