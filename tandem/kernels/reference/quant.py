"""Quantized linear layers in plain PyTorch: the spec the fast kernels are tested against,
and what runs on CPU.

    FP8 W8A8     W (N, K) -> e4m3 Wq, per-output-channel scale sw (N,)   W ~ Wq * sw[:, None]
                 x (T, K) -> e4m3 xq, per-token scale sx (T,), at run time
                 y = (xq @ Wq^T) * sx[:, None] * sw[None, :]    (fp32 accumulate: _scaled_mm)
    INT8 W8A16   Wq int8 (N, K), per-channel scale (N,):        y = x @ (Wq * s)^T
    INT4 W4A16   groups of G along K, per (row, group) scale and, if asymmetric, zero point:
                   symmetric   q in [-8, 7]:  W ~ q * s
                   asymmetric  q in [0, 15]:  W ~ (q - z) * s
                 two 4-bit values per byte along K: byte j of a row = q[2j] | q[2j+1] << 4
                 (stored as unsigned nibbles: symmetric values offset by 8)

Scales are float32. Round-to-nearest everywhere; dequantization happens in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_EPS = 1e-12


def quantize_fp8(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantization along `dim` (the reduced axis): (q, scale) with
    x ~ q.float() * scale, scale shaped like x with `dim` of size 1... squeezed."""
    amax = x.detach().abs().amax(dim=dim, keepdim=True).float().clamp_min(_EPS)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.squeeze(dim)


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) in any float dtype; wq (N, K) e4m3, w_scale (N,) -> (..., N) in x.dtype.
    The activation is quantized per token, as the fast path does."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, x_scale = quantize_fp8(x2)
    y = (xq.float() @ wq.float().t()) * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], wq.shape[0])


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> int8 q (N, K), float32 scale (N,): w ~ q * scale[:, None]."""
    scale = w.detach().abs().amax(dim=1).float().clamp_min(_EPS) / 127.0
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    w = dequantize_int8(q, scale).to(x.dtype)
    return F.linear(x, w, bias)


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(N, K) -> packed uint8 (N, K/2), scales (N, K/G) float32, zeros (N, K/G) uint8 or
    None (symmetric). K must be a multiple of group_size, group_size even."""
    n, k = w.shape
    if k % group_size or group_size % 2:
        raise ValueError(f"int4: in_features {k} must be a multiple of the group size "
                         f"{group_size} (even)")
    g = w.detach().float().reshape(n, k // group_size, group_size)
    if symmetric:
        scale = g.abs().amax(dim=2).clamp_min(_EPS) / 7.0  # q in [-7, 7] (+8 stored)
        q = torch.round(g / scale[..., None]).clamp(-8, 7) + 8
        zeros = None
    else:
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        scale = ((hi - lo) / 15.0).clamp_min(_EPS)
        z = torch.round(-lo / scale).clamp(0, 15)
        q = torch.round(g / scale[..., None] + z[..., None]).clamp(0, 15)
        zeros = z.to(torch.uint8)
    q = q.to(torch.uint8).reshape(n, k)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale, zeros


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int) -> torch.Tensor:
    """The float32 (N, K) weight that `quantize_int4` packed."""
    n = packed.shape[0]
    q = torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(n, -1).float()
    q = q.reshape(n, -1, group_size)
    offset = 8.0 if zeros is None else zeros.float()[..., None]
    return ((q - offset) * scale[..., None]).reshape(n, -1)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                zeros: torch.Tensor | None, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    w = dequantize_int4(packed, scale, zeros, group_size).to(x.dtype)
    return F.linear(x, w, bias)
