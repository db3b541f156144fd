"""RMSNorm (also of summed partial terms) and rotary embedding on CPU float32 through
`elementwise.c` (one pass over the activation where the reference makes five to seven torch
ops); kernels/ops.py sends CPU tensors here, and each function falls back to the reference
(kernels/reference/elementwise.py, the spec) for what the C code does not take: other
dtypes, rows that are not contiguous in their last dim, or no compiled library."""

from __future__ import annotations

import torch

from tandem.kernels.cpu import load_library
from tandem.kernels.reference import elementwise as reference


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """x as (rows, dim) with unit stride in dim and one row stride, or None."""
    if x.dim() == 0 or x.stride(-1) != 1:
        return None
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.shape[0] > 1 and x2.stride(0) < x2.shape[1]:
        return None
    return x2


def _takes(*tensors: torch.Tensor) -> bool:
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and load_library() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x2 = _rows(x) if _takes(x, weight) else None
    if x2 is None or x.numel() == 0 or not weight.is_contiguous():
        return reference.rms_norm(x, weight, eps)
    y = torch.empty(x.shape, dtype=x.dtype)
    load_library().tandem_rms_norm_f32(
        x2.data_ptr(), x2.stride(0), None, None, weight.data_ptr(), y.data_ptr(),
        x2.shape[0], x2.shape[1], eps, torch.get_num_threads())
    return y


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = _rows(x) if _takes(x, residual, weight) else None
    if (x2 is None or x.numel() == 0 or x.shape != residual.shape
            or not residual.is_contiguous() or not weight.is_contiguous()):
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    y, res = torch.empty(x.shape, dtype=x.dtype), torch.empty(x.shape, dtype=x.dtype)
    load_library().tandem_rms_norm_f32(
        x2.data_ptr(), x2.stride(0), residual.data_ptr(), res.data_ptr(), weight.data_ptr(),
        y.data_ptr(), x2.shape[0], x2.shape[1], eps, torch.get_num_threads())
    return y, res


def sum_add_rms_norm(terms: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_add_rms_norm of terms (T, S, H) summed over S, through the same kernel as
    every other norm (a MoE layer's partial sums normed like the full sum)."""
    return fused_add_rms_norm(terms.sum(1), residual, weight, eps)


def _heads(x: torch.Tensor) -> bool:
    """(T, H, D) with D unit stride and heads D apart (a row may be a view into qkv)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
           sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if (not _takes(q, k, cos_cache, sin_cache) or not _heads(q) or not _heads(k)
            or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[2] % 2
            or q.shape[0] == 0 or positions.dtype != torch.int64
            or not positions.is_contiguous() or not cos_cache.is_contiguous()
            or not sin_cache.is_contiguous() or cos_cache.shape[-1] != q.shape[2]):
        return reference.rotary(positions, q, k, cos_cache, sin_cache)
    q_out, k_out = torch.empty(q.shape), torch.empty(k.shape)
    load_library().tandem_rotary_f32(
        positions.data_ptr(), q.data_ptr(), q.stride(0), q.shape[1], q_out.data_ptr(),
        k.data_ptr(), k.stride(0), k.shape[1], k_out.data_ptr(), cos_cache.data_ptr(),
        sin_cache.data_ptr(), q.shape[0], q.shape[2], torch.get_num_threads())
    return q_out, k_out
