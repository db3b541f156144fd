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

Scales are float32. Round-to-nearest everywhere (int4: with each group's clip ratio
searched, quantize_int4); dequantization happens in float32.
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


# Clip ratios tried for each int4 group (search=True): the group's range times r.
_CLIP_RATIOS = (1.0,) + tuple(0.60 + 0.02 * i for i in range(20)) + (0.875,)  # 0.875: amax/8


def _int4_codes(g: torch.Tensor, r: float, symmetric: bool,
                scale_dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round to nearest with the group's range clipped to r times itself: (codes 0..15,
    scale, zero point or None); g (..., G) float32. scale_dtype: the scale is rounded to it
    first (a checkpoint storing scales in bf16 then dequantizes exactly these codes)."""
    if symmetric:  # codes q - 8 in [-8, 7]; r = 1 keeps +-amax exact as +-7 steps
        scale = g.abs().amax(dim=-1).clamp_min(_EPS) * (r / 7.0)
    else:
        lo, hi = g.amin(dim=-1) * r, g.amax(dim=-1) * r
        scale = ((hi - lo) / 15.0).clamp_min(_EPS)
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float().clamp_min(torch.finfo(scale_dtype).tiny)
    if symmetric:
        return torch.round(g / scale[..., None]).clamp(-8, 7) + 8, scale, None
    z = torch.round(-lo / scale).clamp(0, 15)
    return torch.round(g / scale[..., None] + z[..., None]).clamp(0, 15), scale, z


def int4_group_params(g: torch.Tensor, symmetric: bool, search: bool = True,
                      importance: torch.Tensor | None = None,
                      scale_dtype: torch.dtype | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes 0..15, scale, zero point or None) of groups g (..., G), float32.

    search: each group's range is clipped to the ratio in _CLIP_RATIOS whose rounding has
    the least squared error, sum_k importance[k] (w_k - w'_k)^2 (importance (G,): e.g. the
    inputs' mean squares, for activation-aware clipping; default all ones). The min-max
    range (ratio 1) is the first candidate, so no group gets worse than without."""
    if not search:
        return _int4_codes(g, 1.0, symmetric, scale_dtype)
    best = None
    for r in _CLIP_RATIOS:
        q, scale, z = _int4_codes(g, r, symmetric, scale_dtype)
        err = ((q - (8.0 if z is None else z[..., None])) * scale[..., None] - g).square()
        err = (err if importance is None else err * importance).sum(dim=-1)
        if best is None:
            best = [q, scale, z, err]
            continue
        better = err < best[3]
        best = [torch.where(better[..., None], q, best[0]), torch.where(better, scale, best[1]),
                None if z is None else torch.where(better, z, best[2]),
                torch.minimum(err, best[3])]
    return best[0], best[1], best[2]


def check_int4_groups(k: int, group_size: int) -> None:
    """ValueError unless K splits into whole groups of an even size."""
    if k % group_size or group_size % 2:
        raise ValueError(f"int4: in_features {k} must be a multiple of the group size "
                         f"{group_size} (even)")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> uint8 (N, K/2): byte j = code 2j | code 2j+1 << 4."""
    q = codes.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                  search: bool = True, rows_per_chunk: int = 4096
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(N, K) -> packed uint8 (N, K/2), scales (N, K/G) float32, zeros (N, K/G) uint8 or
    None (symmetric). K must be a multiple of group_size, group_size even.

    search: each group's clip ratio chosen by least squared error (int4_group_params);
    off, every group keeps its min-max range. On the embedded model's linears the relative
    squared error goes 0.0141 -> 0.0104 (symmetric) and 0.0103 -> 0.0092 (asymmetric).
    Rows are done rows_per_chunk at a time (memory)."""
    n, k = w.shape
    check_int4_groups(k, group_size)
    codes, scales, zeros = [], [], []
    for r0 in range(0, n, rows_per_chunk):
        g = w[r0:r0 + rows_per_chunk].detach().float().reshape(-1, k // group_size,
                                                               group_size)
        q, scale, z = int4_group_params(g, symmetric, search)
        codes.append(q.reshape(-1, k))
        scales.append(scale)
        zeros.append(z)
    return (pack_int4(torch.cat(codes)), torch.cat(scales),
            None if symmetric else torch.cat(zeros).to(torch.uint8))


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
