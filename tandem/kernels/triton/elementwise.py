"""Fused Triton kernels for the per-token ops around the matmuls (CUDA), one launch each
where PyTorch needs 5-16: RMSNorm (+ residual add), rotary, SiLU-and-mul. Same signatures
and rounding points as `tandem.kernels.reference.elementwise`; math in float32.

    rms_norm        one program per row:   | x[row, 0:D] | -> sum(x^2) -> scale -> store
    rotary          one program per token: all q heads and k heads, both halves at once
    silu_and_mul    a (rows, D / BLOCK) grid over | gate | up |
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.triton.pdl import gdc_launch_dependents, gdc_wait, launch_options


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, r_out_ptr, stride_x, stride_s, stride_r,
                     stride_o, stride_ro, n_cols, eps, HAS_RESIDUAL: tl.constexpr,
                     TERMS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """A row's RMSNorm (+ the residual add). TERMS > 1: x is TERMS terms a row (stride_s
    apart), summed in float32 and rounded once first (sum_add_rms_norm)."""
    if PDL:
        gdc_launch_dependents()
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # a weight: safe ahead of the wait
    if PDL:
        gdc_wait()
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if TERMS > 1:
        for t in tl.static_range(1, TERMS):
            x += tl.load(x_ptr + row * stride_x + t * stride_s + cols, mask=mask,
                         other=0.0).to(tl.float32)
        x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_RESIDUAL:  # the add rounds to the stream's dtype, as in the reference
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(r_out_ptr.dtype.element_ty)
        tl.store(r_out_ptr + row * stride_ro + cols, s, mask=mask)
        x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
          terms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """terms (T, S, H) instead of x: x = terms summed over S."""
    if terms is not None:
        if terms.stride(-1) != 1:
            terms = terms.contiguous()
        x2 = terms[:, 0]
        num_terms, stride_s = terms.shape[1], terms.stride(1)
    else:
        x2, num_terms, stride_s = _rows(x), 1, 0
    n, d = x2.shape
    out = torch.empty(n, d, dtype=x2.dtype, device=x2.device)
    r2 = _rows(residual) if residual is not None else x2
    r_out = torch.empty_like(out) if residual is not None else out
    if n:
        _rms_norm_kernel[(n,)](x2, r2, weight, out, r_out, x2.stride(0), stride_s,
                               r2.stride(0), out.stride(0), r_out.stride(0), d, eps,
                               HAS_RESIDUAL=residual is not None, TERMS=num_terms,
                               BLOCK=triton.next_power_of_2(d), num_warps=4 if d <= 4096 else 8,
                               **launch_options(x2))
    shape = x.shape if terms is None else (n, d)
    res = r_out.view(shape) if residual is not None else None
    return out.view(shape), res


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(x, residual, weight, eps)


def sum_add_rms_norm(terms: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm(None, residual, weight, eps, terms=terms)


@triton.jit
def norm_rotate(x1, x2, w_ptr, eps, cos, sin, d, HALF: tl.constexpr, NORM: tl.constexpr):
    """Heads given as their halves x1, x2 (rows, HALF): [RMSNorm over each head with weight
    w, rounded to the dtype as _rms_norm_kernel rounds it,] then rotary. Returns the rotated
    halves in the dtype. Shared by rotary_write_kv and the decode kernel that rotates its
    own query (decode.py), so both round alike."""
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    if NORM:
        ss = tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)  # (rows,)
        rstd = (1.0 / tl.sqrt(ss / (2 * HALF) + eps))[:, None]
        w1 = tl.load(w_ptr + d).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + d).to(tl.float32)[None, :]
        a = ((a * rstd).to(x1.dtype).to(tl.float32) * w1).to(x1.dtype).to(tl.float32)
        b = ((b * rstd).to(x1.dtype).to(tl.float32) * w2).to(x1.dtype).to(tl.float32)
    # explicit FMAs: the compiler may not contract these products its own way in one kernel
    # and another, so every kernel that rotates rounds alike
    return (tl.fma(a, cos, -(b * sin)).to(x1.dtype), tl.fma(b, cos, a * sin).to(x1.dtype))


@triton.jit
def norm_rotate_heads(base, stride_h, n_heads, w_ptr, eps, cos, sin, d,
                      BLOCK_H: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr):
    """Heads (n_heads, 2 HALF) at base: norm_rotate, stored in place. Returns the rotated
    halves (BLOCK_H, HALF) in the dtype (kv_write.rotary_write_kv writes them)."""
    h = tl.arange(0, BLOCK_H)[:, None]
    mask = h < n_heads
    p1 = base + h * stride_h + d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
    r1, r2 = norm_rotate(x1, x2, w_ptr, eps, cos, sin, d, HALF, NORM)
    tl.store(p1, r1, mask=mask)
    tl.store(p1 + HALF, r2, mask=mask)
    return r1, r2


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt,
                   stride_kh, stride_c, n_q_heads, n_k_heads, HALF: tl.constexpr,
                   BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_c + d)[None, :]  # first half; the halves are equal
    sin = tl.load(sin_ptr + pos * stride_c + d)[None, :]
    norm_rotate_heads(q_ptr + t * stride_qt, stride_qh, n_q_heads, cos_ptr, 0.0, cos, sin, d,
                      BLOCK_QH, HALF, False)
    norm_rotate_heads(k_ptr + t * stride_kt, stride_kh, n_k_heads, cos_ptr, 0.0, cos, sin, d,
                      BLOCK_KH, HALF, False)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
           sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q (T, H, D) and k (T, Hkv, D) in place (they may be strided views of the
    fused QKV output, unit stride along D) and returns them."""
    t, h, d = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and d % 2 == 0 and (d & (d - 1)) == 0
    if t:
        _rotary_kernel[(t,)](positions, q, k, cos_cache, sin_cache, q.stride(0), q.stride(1),
                             k.stride(0), k.stride(1), cos_cache.stride(0), h, k.shape[1],
                             HALF=d // 2, BLOCK_QH=triton.next_power_of_2(h),
                             BLOCK_KH=triton.next_power_of_2(k.shape[1]), num_warps=4,
                             **launch_options(q))
    return q, k


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    act = (g / (1.0 + tl.exp(-g))).to(u.dtype)  # silu rounds to the dtype, then the product
    tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * u.to(tl.float32))
             .to(u.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)
    n, two_d = x2.shape
    d = two_d // 2
    out = torch.empty(n, d, dtype=x.dtype, device=x.device)
    if n:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(n, triton.cdiv(d, block))](x2, out, x2.stride(0), out.stride(0),
                                                         d, BLOCK=block, num_warps=4,
                                                         **launch_options(x2))
    return out.view(*x.shape[:-1], d)
