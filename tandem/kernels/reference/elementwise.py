"""The per-token ops around the matmuls, in plain PyTorch: the spec for their Triton twins.

Numerics follow transformers: RMSNorm in float32, cast to the input dtype, then scaled by
the weight; the residual add rounds in the input dtype; rotary (rotate-half layout) and
SiLU-and-mul compute in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D) -> weight * x / sqrt(mean(x^2) + eps)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def sum_add_rms_norm(terms: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_add_rms_norm of terms (T, S, H) summed over S (float32, rounded once)."""
    return fused_add_rms_norm(terms.sum(1), residual, weight, eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
           sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (T,), q (T, H, D), k (T, Hkv, D); caches (max_pos, D) float32, both halves
    equal. Returns rotated (q, k)."""
    cos = cos_cache[positions].unsqueeze(1)  # (T, 1, D), broadcast over heads
    sin = sin_cache[positions].unsqueeze(1)
    q = q * cos.to(q.dtype) + rotate_half(q) * sin.to(q.dtype)
    k = k * cos.to(k.dtype) + rotate_half(k) * sin.to(k.dtype)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """(..., 2d) = | gate | up | -> silu(gate) * up, (..., d)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
