"""Batch-1 decode's fused matmuls: the input RMSNorm (with its residual add) in a GEMV's
prologue, and the op that consumes the GEMV's output in its epilogue. One launch where the
plain path takes three or four (fused_add_rms_norm, gemv, then rotary + write_kv or
silu_and_mul):

    norm_qkv_rotary_kv   s = x + residual;  qkv = W_qkv rmsnorm(s);  q, k rotated at
                         positions[0];  k, v stored into the KV cache at slot_mapping[0]
    norm_gate_up_silu    s = x + residual;  act = silu(W_gate rmsnorm(s)) * W_up rmsnorm(s)

Each program owns HB pairs of output rows that its epilogue combines:

    qkv, rotate-half layout   head h: | 0 .. D/2-1 | D/2 .. D-1 |
                              pair i of head h = rows (h*D + i, h*D + D/2 + i)
    gate_up                   | gate 0 .. I-1 | up I .. 2I-1 |,  pair n = rows (n, I + n)

and walks K in BLOCK_K tiles, loading both halves' weight rows and the activation tile:

    s[k]   = round(x[k] + residual[k])          (program 0 also stores s: the new residual)
    acc_a += W[row_a, k] * s[k] * norm_w[k];   acc_b likewise;   ss += s[k]^2
    y      = acc * rsqrt(ss / K + eps) (+ bias), rounded to the dtype, then the epilogue

The RMS scale multiplies the finished dot (one pass over x instead of two). The reference
(`kernels/reference/norm_gemv.py`, the existing ops composed) rounds the normalized row to
the dtype before the weight multiply, so the two agree to the dtype's rounding, not bit for
bit; the residual stream (s) and the epilogues round exactly as the reference does. Every
program reads the whole x row (8 KB at hidden 4096, from L2/L1): the price of not launching
the norm. PDL (pdl.py): the first weight tiles load before `gdc_wait`, everything else after.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.triton.pdl import gdc_launch_dependents, gdc_wait, launch_options

_SILU, _ROPE_KV = 0, 1  # the epilogues (MODE)


@triton.jit
def _load_rows(rows, ok, k0, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    kk = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        return tl.load(rows + kk[None, :], mask=ok[:, None], other=0.0)
    return tl.load(rows + kk[None, :], mask=ok[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def _act_tile(x_ptr, r_ptr, nw_ptr, r_out_ptr, k0, K, store_residual,
              HAS_RESIDUAL: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """(s, s * norm_w) of one K tile, float32; s = round(x + residual), stored if asked."""
    kk = k0 + tl.arange(0, BLOCK_K)
    k_ok = kk < K
    if EVEN_K:
        x = tl.load(x_ptr + kk)
        nw = tl.load(nw_ptr + kk).to(tl.float32)
    else:
        x = tl.load(x_ptr + kk, mask=k_ok, other=0.0)
        nw = tl.load(nw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the add rounds to the stream's dtype, as in the reference
        r = tl.load(r_ptr + kk, mask=k_ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r_out_ptr.dtype.element_ty)
        if store_residual:
            tl.store(r_out_ptr + kk, x, mask=k_ok)
    s = x.to(tl.float32)
    return s, s * nw


@triton.jit
def _norm_gemv_kernel(x_ptr, r_ptr, nw_ptr, r_out_ptr, w_ptr, b_ptr, y_ptr,
                      pos_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr,
                      K, stride_w, eps, num_pairs, up_offset, stride_c, kv_stride,
                      k_scale, v_scale, NUM_Q_HEADS, NUM_KV_HEADS,
                      MODE: tl.constexpr, HALF: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                      HAS_BIAS: tl.constexpr, FP8: tl.constexpr, HB: tl.constexpr,
                      BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    j = pid * HB + tl.arange(0, HB)  # this program's pairs
    ok = j < num_pairs
    if MODE == 1:  # rotate-half pairs within a head (HB divides HALF: one head a program)
        row_a = (j // HALF) * (2 * HALF) + j % HALF
        row_b = row_a + HALF
    else:  # gate row n, up row I + n
        row_a = j
        row_b = j + up_offset
    rows_a = w_ptr + row_a.to(tl.int64)[:, None] * stride_w
    rows_b = w_ptr + row_b.to(tl.int64)[:, None] * stride_w
    wa = _load_rows(rows_a, ok, 0, K, BLOCK_K, EVEN_K)  # weights: safe ahead of the wait
    wb = _load_rows(rows_b, ok, 0, K, BLOCK_K, EVEN_K)
    if PDL:
        gdc_wait()  # x and the residual come from the previous kernels
    store_residual = pid == 0
    s, a = _act_tile(x_ptr, r_ptr, nw_ptr, r_out_ptr, 0, K, store_residual, HAS_RESIDUAL,
                     BLOCK_K, EVEN_K)
    ss = s * s
    acc_a = wa.to(tl.float32) * a[None, :]
    acc_b = wb.to(tl.float32) * a[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        wa = _load_rows(rows_a, ok, k0, K, BLOCK_K, EVEN_K)
        wb = _load_rows(rows_b, ok, k0, K, BLOCK_K, EVEN_K)
        s, a = _act_tile(x_ptr, r_ptr, nw_ptr, r_out_ptr, k0, K, store_residual, HAS_RESIDUAL,
                         BLOCK_K, EVEN_K)
        ss += s * s
        acc_a += wa.to(tl.float32) * a[None, :]
        acc_b += wb.to(tl.float32) * a[None, :]
    rstd = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
    ya = tl.sum(acc_a, 1) * rstd
    yb = tl.sum(acc_b, 1) * rstd
    if HAS_BIAS:
        ya += tl.load(b_ptr + row_a, mask=ok, other=0.0).to(tl.float32)
        yb += tl.load(b_ptr + row_b, mask=ok, other=0.0).to(tl.float32)
    dt = y_ptr.dtype.element_ty
    ya = ya.to(dt).to(tl.float32)  # the matmul's output rounds to the dtype, as unfused
    yb = yb.to(dt).to(tl.float32)
    if MODE == 0:  # silu rounds to the dtype, then the product
        act = (ya / (1.0 + tl.exp(-ya))).to(dt).to(tl.float32)
        tl.store(y_ptr + j, (act * yb).to(dt), mask=ok)
    else:
        head = (pid * HB) // HALF
        i = j % HALF
        if head < NUM_Q_HEADS + NUM_KV_HEADS:  # q and k rotate; v does not
            pos = tl.load(pos_ptr)
            cos = tl.load(cos_ptr + pos * stride_c + i)  # first half; the halves are equal
            sin = tl.load(sin_ptr + pos * stride_c + i)
            ya, yb = ya * cos - yb * sin, yb * cos + ya * sin
        out_a = ya.to(dt)
        out_b = yb.to(dt)
        tl.store(y_ptr + row_a, out_a, mask=ok)
        tl.store(y_ptr + row_b, out_b, mask=ok)
        if head >= NUM_Q_HEADS:  # k or v: into the cache slot, as write_kv does
            slot = tl.load(slot_ptr).to(tl.int64)
            if slot >= 0:
                is_v = head >= NUM_Q_HEADS + NUM_KV_HEADS
                kvh = head - NUM_Q_HEADS - tl.where(is_v, NUM_KV_HEADS, 0)
                dst = (cache_ptr + tl.where(is_v, kv_stride, 0)
                       + slot * (NUM_KV_HEADS * 2 * HALF) + kvh * (2 * HALF) + i)
                if FP8:  # e4m3 of K / k_scale, V / v_scale, saturated to its range
                    scale = tl.where(is_v, v_scale, k_scale)
                    qa = tl.clamp(out_a.to(tl.float32) / scale, -448.0, 448.0)
                    qb = tl.clamp(out_b.to(tl.float32) / scale, -448.0, 448.0)
                    tl.store(dst, qa.to(cache_ptr.dtype.element_ty), mask=ok)
                    tl.store(dst + HALF, qb.to(cache_ptr.dtype.element_ty), mask=ok)
                else:
                    tl.store(dst, out_a.to(cache_ptr.dtype.element_ty), mask=ok)
                    tl.store(dst + HALF, out_b.to(cache_ptr.dtype.element_ty), mask=ok)


# (BLOCK_N = 2 * HB output rows a program, BLOCK_K, num_warps, num_stages)
Config = tuple[int, int, int, int]


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One half-precision row on CUDA against a same-dtype, row-major weight."""
    return (x.is_cuda and x.numel() == x.shape[-1] == weight.shape[1]
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.stride(1) == 1)


def _launch(mode: int, x: torch.Tensor, residual: torch.Tensor | None,
            norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
            bias: torch.Tensor | None, y: torch.Tensor, num_pairs: int, config: Config,
            up_offset: int = 0, rope=None, kv=None) -> torch.Tensor:
    """Launches the kernel; returns the new residual (x itself when residual is None)."""
    n_out, k_in = weight.shape
    block_n, block_k, warps, stages = config
    hb = block_n // 2
    x_in, x = x, x.reshape(1, k_in).contiguous()
    if residual is not None:
        residual = residual.reshape(1, k_in).contiguous()
        r_out = torch.empty_like(x)
    else:
        r_out = x_in
    positions, cos, sin, num_heads, num_kv_heads = rope or (x, x, x, 1, 1)
    cache, slots, kv_scale = kv or (x, x, (1.0, 1.0))
    half = cos.shape[-1] // 2 if rope else 1
    _norm_gemv_kernel[(triton.cdiv(num_pairs, hb),)](
        x, residual if residual is not None else x, norm_weight, r_out, weight,
        bias if bias is not None else weight, y, positions, cos, sin, cache, slots,
        k_in, weight.stride(0), eps, num_pairs, up_offset, cos.stride(0) if rope else 0,
        cache.stride(0) if kv else 0, float(kv_scale[0]), float(kv_scale[1]), num_heads,
        num_kv_heads, MODE=_ROPE_KV if rope else _SILU, HALF=half,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None, FP8=kv is not None and cache.dtype == torch.float8_e4m3fn,
        HB=hb, BLOCK_K=block_k, EVEN_K=k_in % block_k == 0, num_warps=warps,
        num_stages=stages, **launch_options(x))
    return r_out


def norm_qkv_rotary_kv(x: torch.Tensor, residual: torch.Tensor | None,
                       norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                       bias: torch.Tensor | None, positions: torch.Tensor,
                       cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                       kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       kv_scale: tuple[float, float], num_heads: int, num_kv_heads: int,
                       config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: (qkv (1, (H + 2 Hkv) D) with q and k rotated, the new residual (1, K)).
    K and V also land in kv_cache (2, blocks, block_size, Hkv, D) at slot_mapping[0]
    (skipped when negative). residual None: no add, and the residual returned is x."""
    n_out, k_in = weight.shape
    head_dim = cos_cache.shape[-1]
    assert n_out == (num_heads + 2 * num_kv_heads) * head_dim and kv_cache.is_contiguous()
    assert kv_cache.shape[3:] == (num_kv_heads, head_dim) and head_dim & (head_dim - 1) == 0
    config = config or qkv_config(n_out, k_in, head_dim)
    assert (head_dim // 2) % (config[0] // 2) == 0, "a program's pairs must share one head"
    y = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    r_out = _launch(_ROPE_KV, x, residual, norm_weight, eps, weight, bias, y, n_out // 2,
                    config, rope=(positions, cos_cache, sin_cache, num_heads, num_kv_heads),
                    kv=(kv_cache, slot_mapping, kv_scale))
    return y, r_out


def norm_gate_up_silu(x: torch.Tensor, residual: torch.Tensor | None,
                      norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                      bias: torch.Tensor | None, config: Config | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: (silu(gate) * up (1, I), the new residual (1, K)); weight (2I, K) is
    | gate | up |. residual None: no add, and the residual returned is x."""
    n_out, k_in = weight.shape
    inter = n_out // 2
    config = config or gate_up_config(n_out, k_in)
    y = torch.empty(1, inter, dtype=x.dtype, device=x.device)
    r_out = _launch(_SILU, x, residual, norm_weight, eps, weight, bias, y, inter, config,
                    up_offset=inter)
    return y, r_out


def qkv_config(n_out: int, k_in: int, head_dim: int) -> Config:
    """The default tile of the QKV kernel (scripts/bench_norm_gemv.py sweeps them)."""
    return (min(4, head_dim), 1024, 8, 4)


def gate_up_config(n_out: int, k_in: int) -> Config:
    """The default tile of the gate/up kernel (scripts/bench_norm_gemv.py sweeps them)."""
    return (4, 1024, 8, 4)
