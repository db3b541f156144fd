"""Weight-only quantized matmuls, y = x W^T with W stored as int8 (per-channel scales) or
int4 (group-wise scales, optional zero points), dequantized in registers.

Layouts: kernels/reference/quant.py is the spec, and the kernels read it as it is through an
int32 view of each row (`words`, no repacking):

    int8  qweight (N, K) int8     -> (N, K/4) words, byte b of word j    = q[4j + b]
    int4  qweight (N, K/2) uint8  -> (N, K/8) words, nibble i of word j  = q[8j + i]
    scales (N,) | (N, K/G) float32, zeros (N, K/G) uint8 or none (symmetric: codes - 8)

Dequantizing without int-to-float conversions (I2F issues at 16 lanes/clk/SM on sm_90, a
quarter of what int4 at HBM speed needs: the I2F kernels stopped at 1.3-1.4 TB/s). A code c
at bit p of a word, masked in place, read as a float32 is the subnormal c 2^(p-149) (exponent
bits zero while p + BITS <= 23; codes above that are shifted down first, one shift a word):

    gemv  (M <= 8 rows, decode)  c 2^(p-149) * (x 2^(100-p)) = c x 2^-49, exact (|x| < 2^27):
          one AND and one FFMA per weight. Offsets come from x alone, per 16-byte quad (32
          int4 / 16 int8 codes, within one group): sum (c - z) x = sum c x - z sum x, z = 8
          (symmetric int4), the zero point, or 128 (int8, sign bits flipped once per word).
          The group scale multiplies the quad sums; the per-channel scale and 2^49, the row
          sums.
    gemm  (more rows)  c 2^(p-149) 2^(127-p) - z 2^-22 = (c - z) 2^-22, exact in bf16/fp16,
          int4 tiles (BLOCK_K = G) into tl.dot, the group scale (x 2^22) on the tile's
          product. int8 / fp8 bytes go through Triton's own cast (no I2F for int8 -> bf16).

gemv layout: a tile is (Q quads, BLOCK_N rows, 4 words), quads first so that a thread holds
one quad of every row in the tile and loads the quad's x (32 or 16 values) once for all:

    row n:  | quad 0 | quad 1 | ... | quad Q-1 |   (16 B each, one vector load)
            thread 0  thread 1 ...                 x[k] of a quad: one 64 B / 32 B load

Also here: `fp8_gemv`, FP8 decode (M <= 8). W8A8 goes to the tensor-core kernel of fp8_gemv.py
(e4m3 x e4m3 QGMMA, no conversions) or to `fp8_cast_gemv`, which casts each weight in
registers: to fp16 for W8A8 (products and sums of eight in fp16, FP8_CAST_HALF), to float32
for fp8 weight-only, which always goes there. FP8_DECODE "auto" (the default) picks by the
H200 sweep (bench/results/2026-12-01-h200-quant/gemv-sweep-fp8-9b069df.log): one row casts
(9.2 / 6.3 / 33.4 / 18.2 us against dot's 10.2 / 7.8 / 33.3 / 19.8 for qkv / o / gate_up /
down), and with fp16 products the widest too (lm_head 128256 rows: 116.5 us against the dot
kernel's ~125; float32 products 132); from two rows the dot kernel (M=2: 11.6 against 14.9
us, M=8: 16.3 against 37.7). And
`quantize_fp8_per_token`, the activation quantizer ahead of `torch._scaled_mm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem import envs
from tandem.kernels.reference.carried_norm import AddNorm, NormedRow
from tandem.kernels.triton.carried_norm import (add_args, add_norm_store, norm_args, norm_scale,
                                               normed_row, row_amax)
from tandem.kernels.triton.fp8_gemv import e4m3_scale, fp8_dot_gemv, to_e4m3
from tandem.kernels.triton.pdl import gdc_launch_dependents, gdc_wait, launch_options


@triton.jit
def _split_last(xt, PER: tl.constexpr):
    """(Q, 4, PER) -> PER tensors (Q, 4), in order of the last index (register renames)."""
    Q: tl.constexpr = xt.shape[0]
    if PER == 4:
        a, b = tl.split(tl.reshape(xt, [Q, 4, 2, 2]))  # a: 0 2, b: 1 3
        a0, a1 = tl.split(a)
        b0, b1 = tl.split(b)
        return a0, b0, a1, b1
    else:
        a, b = tl.split(tl.reshape(xt, [Q, 4, 4, 2]))  # a: 0 2 4 6, b: 1 3 5 7
        aa, ab = tl.split(tl.reshape(a, [Q, 4, 2, 2]))  # aa: 0 4, ab: 2 6
        ba, bb = tl.split(tl.reshape(b, [Q, 4, 2, 2]))  # ba: 1 5, bb: 3 7
        x0, x4 = tl.split(aa)
        x2, x6 = tl.split(ab)
        x1, x5 = tl.split(ba)
        x3, x7 = tl.split(bb)
        return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _int_tile(w, x3, acc, s_ptr, z_ptr, n, n_ok, kw0, KW, quad, BITS: tl.constexpr,
              G: tl.constexpr, HAS_ZERO: tl.constexpr):
    """acc (Q, BLOCK_N) plus one tile: w (Q, BLOCK_N, 4) int32 words, x3 (Q, 4, PER)."""
    PER: tl.constexpr = 32 // BITS  # codes per word
    SHIFT: tl.constexpr = 12 if BITS == 4 else 16  # codes ending above bit 23 come down
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 8:
        w = w ^ -0x7F7F7F80  # 0x80808080: signed byte q -> code q + 128
    hi = w >> SHIFT
    xs = _split_last(x3, PER)
    for i in tl.static_range(PER):
        xi = xs[i].to(tl.float32)  # (Q, 4): the x of code i of each word
        if BITS * i + BITS <= 23:
            c = (w & (MASK << (BITS * i))).to(tl.float32, bitcast=True)
            xp = xi * (2.0 ** (100 - BITS * i))
        else:
            c = (hi & (MASK << (BITS * i - SHIFT))).to(tl.float32, bitcast=True)
            xp = xi * (2.0 ** (100 - BITS * i + SHIFT))
        if i == 0:
            t = c * xp[:, None, :]  # (Q, BLOCK_N, 4): sum c x 2^-49 per word
            xsum = xi
        else:
            t += c * xp[:, None, :]
            xsum += xi
    xq = tl.sum(xsum, 1) * (2.0 ** -49)  # (Q,): sum x per quad, in t's units
    if BITS == 8:
        return acc + tl.sum(t, 2) - 128.0 * xq[:, None]
    gi = n.to(tl.int64)[None, :] * (KW * 8 // G) + ((kw0 + quad * 4) // (G // 8))[:, None]
    g_ok = n_ok[None, :] & (kw0 + quad * 4 < KW)[:, None]  # (Q, BLOCK_N)
    s = tl.load(s_ptr + gi, mask=g_ok, other=0.0)
    if HAS_ZERO:
        z = tl.load(z_ptr + gi, mask=g_ok, other=0).to(tl.float32)
    else:
        z = 8.0
    return acc + (tl.sum(t, 2) - z * xq[:, None]) * s


@triton.jit
def _load_words(w_ptrs, n_ok, word, kw0, KW, EVEN: tl.constexpr):
    # Masked-off words are left undefined: any word decodes to finite codes, rows past N are
    # never stored, and past K the x (and so every product) is zero.
    if EVEN:
        return tl.load(w_ptrs + kw0)
    return tl.load(w_ptrs + kw0, mask=n_ok[None, :, None] & (kw0 + word < KW)[:, None, :])


@triton.jit
def _load_x(x_ptrs, word, kw0, KW, PER: tl.constexpr, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(x_ptrs + kw0 * PER)  # (Q, 4, PER)
    return tl.load(x_ptrs + kw0 * PER, mask=(kw0 + word < KW)[:, :, None], other=0.0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, KW, stride_xm, stride_ym,
                 ss_in_ptr, P_in, eps, r_ptr, nw_ptr, sres_ptr, ss_ptr, am_ptr,
                 BITS: tl.constexpr, G: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                 EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, NORM_IN: tl.constexpr,
                 P_BLOCK: tl.constexpr, ADD_NORM: tl.constexpr, AMAX_OUT: tl.constexpr,
                 PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    PER: tl.constexpr = 32 // BITS
    Q: tl.constexpr = BLOCK_KW // 4
    m = tl.program_id(0)  # rows of x fastest: they share the weight block (L2)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    quad = tl.arange(0, Q)
    word = quad[:, None] * 4 + tl.arange(0, 4)[None, :]  # (Q, 4)
    w_ptrs = w_ptr + n.to(tl.int64)[None, :, None] * KW + word[:, None, :]  # (Q, BLOCK_N, 4)
    x_ptrs = x_ptr + m * stride_xm + word[:, :, None] * PER + tl.arange(0, PER)[None, None, :]
    w = _load_words(w_ptrs, n_ok, word, 0, KW, EVEN_N and EVEN_K)  # ahead of the wait
    if PDL:
        gdc_wait()  # x comes from the previous kernel (pdl.py)
    acc = _int_tile(w, _load_x(x_ptrs, word, 0, KW, PER, EVEN_K),
                    tl.zeros([Q, BLOCK_N], dtype=tl.float32), s_ptr, z_ptr, n, n_ok, 0, KW,
                    quad, BITS, G, HAS_ZERO)
    for kw0 in range(BLOCK_KW, KW, BLOCK_KW):
        acc = _int_tile(_load_words(w_ptrs, n_ok, word, kw0, KW, EVEN_N and EVEN_K),
                        _load_x(x_ptrs, word, kw0, KW, PER, EVEN_K), acc, s_ptr, z_ptr, n,
                        n_ok, kw0, KW, quad, BITS, G, HAS_ZERO)
    y = tl.sum(acc, 0) * (2.0 ** 49)  # (BLOCK_N,)
    if BITS == 8:
        y *= tl.load(s_ptr + n, mask=n_ok, other=0.0)
    if NORM_IN:  # one row (carried_norm.py)
        y *= norm_scale(ss_in_ptr, P_in, KW * PER, eps, P_BLOCK)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    if ADD_NORM:  # one row
        add_norm_store(y, n, n_ok, tl.program_id(1), r_ptr, nw_ptr, sres_ptr, y_ptr, ss_ptr,
                       am_ptr, AMAX_OUT)
    else:
        tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _float_tile(x_ptr, w, k0, x_inv, QUANT_X: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, HALF: tl.constexpr):
    """A tile's products, float32: (BLOCK_N, BLOCK_K) each weight against its x, or, HALF
    (W8A8 only: x e4m3, or quantized to it here), (BLOCK_N, BLOCK_K / 8) sums of eight
    products formed and summed in fp16, in units of 2^-8. e4m3 values are exact in fp16, and
    so is their product (4 significant bits each); x scaled by 2^-8 keeps every product
    within [2^-26, 2^9.6] and a sum of eight below 2^12.6 (fp16 stops at 2^16); products
    under 2^-14 round to fp16's subnormal step, 2^-24. An fp16 sum of eight rounds at 2^-11
    of itself, finer than the e4m3 steps of x and w (2^-4)."""
    x = tl.load(x_ptr + k0 + tl.arange(0, BLOCK_K))
    if QUANT_X:
        x = to_e4m3(x, x_inv)
    # one return: compiled Triton (not the interpreter) refuses a return inside a constexpr
    # branch followed by another of a different shape
    if HALF:
        x = (x.to(tl.float32) * (2.0 ** -8)).to(tl.float16)
        p = w.to(tl.float16) * x[None, :]
        t = tl.sum(tl.reshape(p, [BLOCK_N, BLOCK_K // 8, 8]), 2).to(tl.float32)
    else:
        t = w.to(tl.float32) * x.to(tl.float32)[None, :]
    return t


@triton.jit
def _gemv_float_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, xs_ptr, N, K, stride_xm, stride_ym,
                       ss_in_ptr, P_in, eps, am_in_ptr, r_ptr, nw_ptr, sres_ptr, ss_ptr, am_ptr,
                       HAS_BIAS: tl.constexpr, HAS_XSCALE: tl.constexpr, QUANT_X: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALF: tl.constexpr,
                       AMAX_K: tl.constexpr, NORM_IN: tl.constexpr, P_BLOCK: tl.constexpr,
                       AMAX_IN: tl.constexpr, ADD_NORM: tl.constexpr, AMAX_OUT: tl.constexpr,
                       PDL: tl.constexpr):
    """fp8 weights (per-channel scales), cast in the loop: e4m3 converts in pairs (cvt to
    f16x2), no I2F. Each weight then goes to float32 (a second conversion a weight: the
    conversion unit's 16 lanes/clk/SM cap that near 2.8 TB/s), or, HALF (W8A8 only),
    stays fp16 for its product and a sum of eight (_float_tile). QUANT_X: x is half
    precision and each program quantizes its row to e4m3 itself, with the same arithmetic as
    _fp8_rows_kernel (a pass over the row for its amax, ~8 KB from L2), instead of a separate
    kernel per linear. One row may carry an RMSNorm (carried_norm.py): NORM_IN, x the
    producer's xn with its sums of squares, and AMAX_IN its partial maxima of |xn| (no pass
    over the row here); ADD_NORM, the producer's epilogue."""
    if PDL:
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    rows = w_ptr + n.to(tl.int64)[:, None] * K
    x_row = x_ptr + m * stride_xm
    # rows past N are masked (no `other`: 0 cannot cast to fp8); never stored
    w = tl.load(rows + k[None, :], mask=n_ok[:, None])  # the first tile, ahead of the wait
    if PDL:
        gdc_wait()  # x comes from the previous kernel (pdl.py)
    x_scale = 1.0
    x_inv = 1.0
    if QUANT_X and AMAX_IN:  # one load of the producer's P partial maxima
        x_scale, x_inv = e4m3_scale(row_amax(am_in_ptr, P_in, P_BLOCK))
    elif QUANT_X:  # K / AMAX_K loads of x, each an L2 round trip (fp8_amax_k)
        ka = tl.arange(0, AMAX_K)
        amax = tl.zeros([AMAX_K], dtype=tl.float32)
        for k0 in range(0, K, AMAX_K):
            xa = tl.load(x_row + k0 + ka, mask=k0 + ka < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(xa.to(tl.float32)))
        x_scale, x_inv = e4m3_scale(tl.max(amax, 0))
    acc = _float_tile(x_row, w, 0, x_inv, QUANT_X, BLOCK_N, BLOCK_K, HALF)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = tl.load(rows + k0 + k[None, :], mask=n_ok[:, None])
        acc += _float_tile(x_row, w, k0, x_inv, QUANT_X, BLOCK_N, BLOCK_K, HALF)
    y = tl.sum(acc, 1) * tl.load(s_ptr + n, mask=n_ok, other=0.0)
    if HALF:
        y *= 256.0  # _float_tile's 2^-8
    if HAS_XSCALE:  # FP8 W8A8: x holds e4m3 values with one scale per row
        y *= tl.load(xs_ptr + m)
    if QUANT_X:
        y *= x_scale
    if NORM_IN:  # one row
        y *= norm_scale(ss_in_ptr, P_in, K, eps, P_BLOCK)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    if ADD_NORM:  # one row
        add_norm_store(y, n, n_ok, pid_n, r_ptr, nw_ptr, sres_ptr, y_ptr, ss_ptr, am_ptr,
                       AMAX_OUT)
    else:
        tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _code(w, hi, z, I: tl.constexpr, BITS: tl.constexpr):
    """Code I of each word minus the zero point, times 2^-22, exact: one AND, one FFMA."""
    SHIFT: tl.constexpr = 12 if BITS == 4 else 16
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS * I + BITS <= 23:
        c = (w & (MASK << (BITS * I))).to(tl.float32, bitcast=True)
        return c * (2.0 ** (127 - BITS * I)) - z
    else:
        c = (hi & (MASK << (BITS * I - SHIFT))).to(tl.float32, bitcast=True)
        return c * (2.0 ** (127 - BITS * I + SHIFT)) - z


@triton.jit
def _dequant_int4(w, z):
    """(BLOCK_N, BKW) int32 words -> (BLOCK_N, 8 BKW) (code - z) 2^-22 in k order; z holds
    the zero points times 2^-22, (BLOCK_N, 1). join(a, b) interleaves a and b along a new last
    axis, so the tree below puts code i at position i of each word's 8."""
    hi = w >> 12
    w3 = tl.join(tl.join(tl.join(_code(w, hi, z, 0, 4), _code(w, hi, z, 4, 4)),
                         tl.join(_code(w, hi, z, 2, 4), _code(w, hi, z, 6, 4))),
                 tl.join(tl.join(_code(w, hi, z, 1, 4), _code(w, hi, z, 5, 4)),
                         tl.join(_code(w, hi, z, 3, 4), _code(w, hi, z, 7, 4))))
    return tl.reshape(w3, [w.shape[0], w.shape[1] * 8])


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                 BITS: tl.constexpr, G: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """Tiles (BLOCK_M, BLOCK_N, BLOCK_K) into tl.dot (fp32 accumulate). BITS == 4: int32 words
    (N, K/8), BLOCK_K == G; BITS == 8: int8 or fp8 bytes (N, K), per-channel scales."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_rows = x_ptr + m.to(tl.int64)[:, None] * stride_xm
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_rows + k0 + k[None, :], mask=m_ok[:, None], other=0.0)
        if BITS == 8:
            w = tl.load(w_ptr + n.to(tl.int64)[:, None] * K + k0 + k[None, :],
                        mask=n_ok[:, None])  # rows past N never stored
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))  # int8 / e4m3 -> exact in bf16
        else:
            j = tl.arange(0, BLOCK_K // 8)
            w = tl.load(w_ptr + n.to(tl.int64)[:, None] * (K // 8) + k0 // 8 + j[None, :],
                        mask=n_ok[:, None], other=0)
            g = n.to(tl.int64) * (K // G) + k0 // G  # one group per tile
            s = tl.load(s_ptr + g, mask=n_ok, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + g, mask=n_ok, other=0).to(tl.float32)
            else:
                z = tl.full([BLOCK_N], 8.0, tl.float32)
            wq = _dequant_int4(w, z[:, None] * (2.0 ** -22)).to(x.dtype)
            acc += tl.dot(x, tl.trans(wq)) * (s * (2.0 ** 22))[None, :]
    if BITS == 8:
        acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + m.to(tl.int64)[:, None] * stride_ym + n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


GEMV_MAX_ROWS = 8
# From this many rows (prefill chunks, large decode batches) a weight is dequantized into a
# scratch bf16/fp16 copy and cuBLAS does the matmul: writing and reading the copy costs
# about what streaming 2-4x the quantized bytes does, while the fused GEMM's dequantizing
# tiles stop it at ~230 TFLOP/s (int4, H200) against cuBLAS's ~650.
DEQUANT_MIN_ROWS = 256


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, z_ptr, out_ptr, N, K, BITS: tl.constexpr, G: tl.constexpr,
                    HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out (N, K) = dequantized weight in out's dtype, rounded once from float32 exactly as
    kernels/reference/quant.py computes it. BITS 4: q packed uint8 (N, K/2), scales
    (N, K/G), zeros (N, K/G) or 8; BITS 8: q int8 or e4m3 (N, K), scales (N,)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = n < N, k < K
    ok = n_ok[:, None] & k_ok[None, :]
    rows = n.to(tl.int64)[:, None]
    if BITS == 4:
        j = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        b = tl.load(q_ptr + rows * (K // 2) + j[None, :],
                    mask=n_ok[:, None] & (j < K // 2)[None, :], other=0).to(tl.int32)
        c = tl.reshape(tl.join(b & 0xF, b >> 4), [BLOCK_N, BLOCK_K]).to(tl.float32)
        g = rows * (K // G) + (k // G)[None, :]
        s = tl.load(s_ptr + g, mask=ok, other=0.0)
        if HAS_ZERO:
            z = tl.load(z_ptr + g, mask=ok, other=0).to(tl.float32)
        else:
            z = 8.0
        w = (c - z) * s
    else:
        w = tl.load(q_ptr + rows * K + k[None, :], mask=ok).to(tl.float32)  # (no `other`:
        w = w * tl.load(s_ptr + n, mask=n_ok, other=0.0)[:, None]  # e4m3 has no 0 cast)
    tl.store(out_ptr + rows * K + k[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in `dtype` (reference: quant.dequantize_int4 / dequantize_int8,
    then .to(dtype)). qweight: packed uint8 (N, K/2) for int4, int8 or e4m3 (N, K)."""
    n = qweight.shape[0]
    k = qweight.shape[1] * (2 if bits == 4 else 1)
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    block_n, block_k = 16, 256
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        qweight.contiguous(), scales, zeros if zeros is not None else scales, out, n, k,
        BITS=bits, G=group_size if bits == 4 else k, HAS_ZERO=zeros is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def gemv_config(bits: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_KW, num_warps) for the int GEMV, from the H200 sweep of
    scripts/bench_quant_gemv.py on Llama-3.1-8B's shapes (bench/results/2026-12-01-h200-quant/
    gemv-sweep.json): one 16-byte quad a thread per tile row, small programs (64-128 threads)
    so that many are resident, fewer when N is large (gate_up: 28672 rows); loading the next
    tile a step ahead never won. Within 1-3% of each shape's best."""
    kw = k * bits // 32
    if bits == 4:
        cfg = (8, 128, 1) if n >= 16384 else (8, 256, 2)
    elif n >= 16384:
        cfg = (4, 256, 1)
    elif n > k and kw < 2048:
        cfg = (4, 256, 2)
    else:
        cfg = (4, 512, 4)
    block_n, block_kw, warps = cfg
    while block_kw > 16 and block_kw > triton.next_power_of_2(kw):  # short rows
        block_kw //= 2
        warps = max(1, warps // 2)
    return block_n, block_kw, warps


# W8A8 in fp8_cast_gemv: fp16 products and sums of eight (_float_tile) instead of float32
FP8_CAST_HALF = envs.fp8_cast_half()


FP8_AMAX_K = envs.fp8_amax_k()  # None: auto; 0: BLOCK_K, as before (A/B runs)


def fp8_amax_k(k: int, block_k: int, warps: int) -> int:
    """x values a load in fp8_cast_gemv's amax pass (QUANT_X). The pass runs after the PDL
    wait, before any product, so each of its loads is an L2 round trip on the launch's
    critical path (K / BLOCK_K of them before: up to 8). Wider loads hold more registers
    (sm_90a, ptxas of Triton 3.6, (16, 512, 4) with fp16 products: 60 a thread at 512 values,
    64 at 1024, 70 at 2048, 91 at 4096; eight programs an SM fit up to 64), so by default
    eight values a thread, and never fewer than BLOCK_K."""
    if FP8_AMAX_K == 0:
        return block_k
    most = FP8_AMAX_K if FP8_AMAX_K is not None else max(block_k, 256 * warps)
    return min(most, triton.next_power_of_2(k))


def fp8_gemv_config(n: int, k: int, half: bool = False) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for fp8_cast_gemv, from the H200 sweeps (the second,
    gemv-sweep-fp8-9b069df.log: gate_up 33.4 us at (16, 512, 4) against 34.9, down 18.2 at
    (16, 1024, 8) against 19.0). half (fp16 products): bench/results/
    2026-12-02-h200-fp8-half-c90bf4a/gemv-sweep.log, qkv 8.93 us at (16, 1024, 8), o 5.99
    and down 16.40 at (16, 2048, 8), gate_up 29.07 and lm_head 116.46 at (16, 512, 4)."""
    if half:
        if n >= 16384 or k % 1024:
            return 16, 512, 4
        if n > k or k % 2048:
            return 16, 1024, 8
        return 16, 2048, 8
    if n >= 65536:
        return 16, 256, 4
    if n >= 16384:
        return 16, 512, 4
    if k >= 2 * n and k % 1024 == 0:
        return 16, 1024, 8
    if n > k or k % 1024:
        return 16, 512, 4
    return 8, 1024, 4


def int_gemv(x2: torch.Tensor | NormedRow, qweight: torch.Tensor, scales: torch.Tensor,
             zeros: torch.Tensor | None, bits: int, group_size: int,
             bias: torch.Tensor | None = None,
             config: tuple[int, int, int] | None = None, add: AddNorm | None = None
             ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
    """x2 (M, K), last dim contiguous; qweight int8 (N, K) or packed uint8 (N, K/2) -> (M, N).
    One row may carry an RMSNorm (carried_norm.py): x2 a NormedRow, and/or `add` (then the
    result is (NormedRow of the next norm, the new residual))."""
    x2, norm_in, norm_flags = norm_args(x2)
    m, k = x2.shape
    assert m == 1 or (add is None and not norm_flags["NORM_IN"]), "a carried norm is one row"
    n = qweight.shape[0]
    words = qweight.contiguous().view(torch.int32)  # (N, K * bits / 32), the same bytes
    kw = words.shape[1]
    block_n, block_kw, warps = config or gemv_config(bits, n, k)
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    programs = triton.cdiv(n, block_n)
    add_in, add_flags, s, parts = add_args(add, y, programs)
    _gemv_kernel[(m, programs)](
        x2, words, scales, zeros if zeros is not None else scales,
        bias if bias is not None else scales, y, n, kw, x2.stride(0), y.stride(0),
        *norm_in, *add_in, BITS=bits, G=group_size if bits == 4 else 32,
        HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_KW=block_kw, EVEN_N=n % block_n == 0, EVEN_K=kw % block_kw == 0,
        **add_flags, **norm_flags, num_warps=warps, num_stages=1,
        **launch_options(x2))
    return y if add is None else (normed_row(y, parts, add), s)


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bits: int, group_size: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) half precision -> (..., N): x @ dequant(W)^T (+ bias). bits 8: qweight int8,
    or e4m3 (fp8 weight-only, cast in the loop)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    n = qweight.shape[0]
    if m <= GEMV_MAX_ROWS:
        if qweight.dtype in (torch.int8, torch.uint8):
            y = int_gemv(x2, qweight, scales, zeros, bits, group_size, bias)
        else:
            y = fp8_gemv(x2, None, qweight, scales, bias, x.dtype)
        return y.reshape(*shape[:-1], n)
    if m >= DEQUANT_MIN_ROWS:  # the weight in x's dtype, then cuBLAS (DEQUANT_MIN_ROWS)
        w = dequantize(qweight, scales, zeros, bits, group_size, x.dtype)
        return torch.nn.functional.linear(x2, w, bias).reshape(*shape[:-1], n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else (32 if m <= 32 else (64 if m <= 64 else 128))
    # int4 tiles of 128 x 128 (or 128 x 256, G = 256) dequantized at once spill registers
    block_n = 64 if bits == 4 and (block_m == 128 or group_size > 128) else 128
    _gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
        x2, qweight.contiguous().view(torch.int32) if bits == 4 else qweight, scales,
        zeros if zeros is not None else scales, bias if bias is not None else scales, y,
        m, n, k, x2.stride(0), y.stride(0), BITS=bits, G=group_size if bits == 4 else k,
        HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=group_size if bits == 4 else 64,
        num_warps=8 if block_m >= 64 else 4, num_stages=3)
    return y.reshape(*shape[:-1], n)


# FP8 W8A8 decode: "dot", the tensor-core kernel (fp8_gemv.py), "cast", fp8_cast_gemv, or
# "auto": by rows and width, from the H200 sweep (module docstring). TANDEM_FP8_DECODE.
FP8_DECODE = envs.fp8_decode()
DOT_MIN_N_ONE_ROW = 65536  # one row: the dot kernel only for matrices this wide


def _use_dot(rows: int, n: int) -> bool:
    if FP8_DECODE == "auto":  # with fp16 products the cast kernel wins the widest too
        return rows > 1 or (n >= DOT_MIN_N_ONE_ROW and not FP8_CAST_HALF)
    return FP8_DECODE == "dot"


def fp8_gemv(xq: torch.Tensor, x_scale: torch.Tensor | None, wq: torch.Tensor,
             w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
             config: tuple[int, int, int] | None = None,
             quantize_x: bool = False) -> torch.Tensor:
    """A few rows (M <= 8) against e4m3 wq (N, K) with per-channel scales -> (M, N) in
    out_dtype, sums in fp32 (as _scaled_mm). FP8 W8A8: xq e4m3 with per-row scales x_scale,
    or (quantize_x) xq half precision, quantized per row to e4m3 inside the kernel, x_scale
    None. fp8 weight-only: xq half precision, x_scale None. W8A8 runs fp8_dot_gemv where
    FP8_DECODE says (auto: more than one row, or the widest matrices); weight-only, "cast",
    or a config (BLOCK_N, BLOCK_K, num_warps) run fp8_cast_gemv."""
    assert not (quantize_x and x_scale is not None)
    w8a8 = quantize_x or x_scale is not None
    if (w8a8 and config is None and xq.shape[0] <= GEMV_MAX_ROWS
            and _use_dot(xq.shape[0], wq.shape[0])):
        return fp8_dot_gemv(xq, x_scale, wq, w_scale, bias, out_dtype)
    return fp8_cast_gemv(xq, x_scale, wq, w_scale, bias, out_dtype, config, quantize_x)


def fp8_cast_gemv(xq: torch.Tensor | NormedRow, x_scale: torch.Tensor | None,
                  wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  out_dtype: torch.dtype, config: tuple[int, int, int] | None = None,
                  quantize_x: bool = False, add: AddNorm | None = None
                  ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
    """fp8_gemv on CUDA cores, each weight cast (K a multiple of BLOCK_K). config (BLOCK_N,
    BLOCK_K, num_warps[, half]): fp8_gemv_config by default; half (W8A8 only; default
    FP8_CAST_HALF there): products and sums of eight in fp16 (_float_tile). One row may carry
    an RMSNorm (carried_norm.py): xq a NormedRow (quantized in the kernel, quantize_x, from
    its amax where the producer left one), and/or `add` (then the result is (NormedRow of the
    next norm, the new residual))."""
    amax_in = xq.amax if isinstance(xq, NormedRow) and quantize_x else None
    xq, norm_in, norm_flags = norm_args(xq)
    m, k = xq.shape
    n = wq.shape[0]
    assert m == 1 or (add is None and not norm_flags["NORM_IN"]), "a carried norm is one row"
    assert amax_in is None or amax_in.numel() == norm_in[1], "one partial max a sum of squares"
    w8a8 = quantize_x or x_scale is not None
    default_half = FP8_CAST_HALF and w8a8
    block_n, block_k, warps, *rest = config or fp8_gemv_config(n, k, default_half)
    half = bool(rest[0]) if rest else default_half
    if half and not w8a8:
        raise ValueError("fp8_cast_gemv: fp16 products need x in e4m3 (W8A8)")
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    programs = triton.cdiv(n, block_n)
    add_in, add_flags, s, parts = add_args(add, y, programs)
    _gemv_float_kernel[(programs, m)](
        xq, wq, w_scale, bias if bias is not None else w_scale, y,
        x_scale if x_scale is not None else w_scale, n, k, xq.stride(0), y.stride(0),
        *norm_in, amax_in if amax_in is not None else w_scale, *add_in,
        HAS_BIAS=bias is not None, HAS_XSCALE=x_scale is not None, QUANT_X=quantize_x,
        **launch_options(xq), BLOCK_N=block_n,
        BLOCK_K=block_k, HALF=half, AMAX_K=fp8_amax_k(k, block_k, warps) if quantize_x else 16,
        AMAX_IN=amax_in is not None, **add_flags, **norm_flags,
        num_warps=warps, num_stages=1)
    return y if add is None else (normed_row(y, parts, add), s)


def supported(x: torch.Tensor, k: int, bits: int, group_size: int) -> bool:
    """Whether quant_linear handles this input: CUDA half precision; K a multiple of 512 for
    8-bit weights, of the group size for int4, with groups of 32 to 256 (a power of two)."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
        return False
    if bits == 8:
        return k % 512 == 0
    return group_size in (32, 64, 128, 256) and k % group_size == 0


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # x comes from the previous kernel
    m = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + m * stride_xm + k0 + k, mask=k0 + k < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale, inv = e4m3_scale(tl.max(amax, 0))
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + m * stride_xm + k0 + k, mask=k0 + k < K, other=0.0)
        tl.store(q_ptr + m * K + k0 + k, to_e4m3(x, inv), mask=k0 + k < K)
    tl.store(s_ptr + m, scale)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> e4m3 q (M, K), float32 scale (M,): kernels/reference/quant.quantize_fp8
    along the last dim, in one kernel."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    _fp8_rows_kernel[(m,)](x, q, s, k, x.stride(0), BLOCK_K=min(4096, triton.next_power_of_2(k)),
                           num_warps=8, **launch_options(x))
    return q, s
