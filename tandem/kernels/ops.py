"""The per-token ops the layers call: the fused Triton kernel for CUDA tensors where triton
imports, else the PyTorch reference with the same signature (CPU, and the spec). `linear`
sends single-row half-precision CUDA matmuls (batch-1 decode) to the Triton GEMV."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.kernels.reference import elementwise as reference

try:
    from tandem.kernels.triton import elementwise as fused
    from tandem.kernels.triton.gemv import gemv
except ImportError:  # no triton: CPU-only installs
    fused = gemv = None


def _impl(x: torch.Tensor):
    return fused if fused is not None and x.is_cuda else reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _impl(x).rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(x).fused_add_rms_norm(x, residual, weight, eps)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
           sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(q).rotary(positions, q, k, cos_cache, sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _impl(x).silu_and_mul(x)


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., in) -> (..., out) = x W^T (+ b)."""
    if (gemv is not None and x.is_cuda and x.numel() == x.shape[-1]
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.stride(-1) == 1):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)
