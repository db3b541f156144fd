"""FP8 W8A8 decode GEMV on the tensor cores: y = (xq @ Wq^T) * sx[:, None] * sw[None, :]
(+ bias) for M <= 16 rows, e4m3 x e4m3 products summed in fp32 by wgmma (QGMMA), with no
conversion of a weight anywhere.

Why: the cast path (quant_gemm._gemv_float_kernel) turns every e4m3 weight into a float32
(cvt.f16x2.e4m3x2 + cvt.f32.f16), and the conversion unit's 16 lanes/clk/SM cap it near
2.8 TB/s. Here a weight byte goes HBM -> shared memory (cp.async, num_stages deep) -> QGMMA.

Operands swapped. A Hopper wgmma covers 64 rows a warpgroup, and Triton lowers a dot with 16
rows to mma.sync instead, for which it converts fp8 operands to fp16 on sm_90 (an F2FP per
weight, the cost this kernel exists to avoid). So the weights are the A operand:

    acc (BLOCK_N, 16) += W tile (BLOCK_N, BLOCK_K) @ xq tile^T (BLOCK_K, 16)   QGMMA.64x16x32

Both operands are K-major, which fp8 wgmma requires: W is (N, K) row-major, and the x tile
(16, BLOCK_K) lands in shared memory row-major. Rows of x past M load as zeros.

x is either half precision, quantized per row in the kernel (QUANT_X: every program does it
for the rows it needs, two passes over x, both from L2), or e4m3 with per-row scales from
quantize_fp8_per_token. Either way the e4m3 values are those of _fp8_rows_kernel, bit for bit
(e4m3_scale, to_e4m3), and so is y:

    1. amax  the rows' chunks of XCHUNK values, flattened (r = m * C + c, C = cdiv(K, XCHUNK)),
             XROWS chunks a step: M K / (XROWS XCHUNK) round trips to L2, whatever M is
    2. loop  q = e4m3(x * (1 / sx)) for each (16, BLOCK_K) tile, sx = amax / 448; the 16 - M
             padding rows are quantized too (zeros): the x work a weight byte is 16 / BLOCK_N

Split-K (too few column blocks to fill the SMs: o_proj, down_proj): programs (j, s) sum K tiles
[s T, (s + 1) T) of column block j, and the last to finish adds the partials up:

    part (blocks, SPLIT_K, BLOCK_N, 16) fp32    cnt (blocks,) int32, zero between launches
    program (j, s):  part[j, s] = acc;  bar.sync;  a = atomic_add(cnt[j], 1)  (acq_rel, gpu)
    if a == SPLIT_K - 1:  acc = part[j, 0] + ... + part[j, SPLIT_K - 1]  (in split order)
                          cnt[j] = 0;  scales, bias, store y

One launch, and deterministic (the same sum order whichever program arrives last). fp32 atomics
into y would need y zeroed and in fp32 (a memset and a cast kernel around this one, and an
order that changes run to run); a second reduction kernel costs a launch and a grid-dependency
wait on each of the two split linears of every layer. The workspace is per device, shared by
launches in stream order (as the decode step issues them; with PDL, a kernel touches it only
after gdc_wait, when the previous launch has finished and reset its counters).

PDL (pdl.py): the weight scales and bias load, and (prefetch_k) the first bytes of each weight
row are requested into L2, before gdc_wait; x, the workspace and y come after it.

Under TRITON_INTERPRET=1 (Triton 3.6) the kernel runs as written, fp8 tl.dot included, but
the interpreter's float32 -> e4m3 cast drops the carry when rounding up crosses a power of two
(127.3 -> 64): x quantized in the kernel there is off by up to 2x in a few values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem.kernels.triton.pdl import gdc_launch_dependents, gdc_wait, launch_options

BLOCK_M = 16  # rows of x a program, padded: the smallest N of a tl.dot
XCHUNK = 512  # x values a chunk in the amax pass


@triton.jit
def e4m3_scale(amax):
    """The per-row scale of an activation row, max(amax, 1e-12) / 448 (reference quant.py),
    and its reciprocal. Every Triton kernel that quantizes activations uses this and
    `to_e4m3`, so that they agree to the bit."""
    scale = tl.maximum(amax, 1e-12) / 448.0
    return scale, 1.0 / scale


@triton.jit
def to_e4m3(x, inv_scale):
    """x / scale rounded to e4m3, as x times the reciprocal: a division an element was a third
    of fp8_dot's loop (349 -> 228 SASS instructions a thread a tile). The product is within an
    fp32 rounding of x / scale, so the e4m3 value is the reference's except where x / scale is
    an exact tie (bf16 inputs make those common enough to see): one step up instead of to
    even, as close. |x| <= amax: the product overshoots 448 by a rounding at most, which the
    cast (cvt.rn.satfinite) brings back, no clamp needed."""
    return (x.to(tl.float32) * inv_scale).to(tl.float8e4nv)


@triton.jit
def _row_scales(x_ptr, M, K, stride_xm, BLOCK_M: tl.constexpr, XROWS: tl.constexpr,
                XCHUNK: tl.constexpr):
    """e4m3_scale of each row of x: (BLOCK_M,) scales and reciprocals (rows past M: as amax 0)."""
    C = tl.cdiv(K, XCHUNK)  # chunks a row
    r = tl.arange(0, XROWS)
    kk = tl.arange(0, XCHUNK)
    rows = tl.arange(0, BLOCK_M)
    amax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r0 in range(0, M * C, XROWS):
        rm = (r0 + r) // C  # (XROWS,) the row of each chunk
        kc = (r0 + r) % C * XCHUNK  # and where it starts
        ok = (r0 + r < M * C)[:, None] & (kc[:, None] + kk[None, :] < K)
        v = tl.load(x_ptr + rm[:, None] * stride_xm + kc[:, None] + kk[None, :], mask=ok,
                    other=0.0)  # (XROWS, XCHUNK)
        cmax = tl.max(tl.abs(v.to(tl.float32)), 1)  # (XROWS,)
        amax = tl.maximum(amax, tl.max(tl.where(rm[None, :] == rows[:, None],
                                                cmax[None, :], 0.0), 1))
    return e4m3_scale(amax)


@triton.jit
def _prefetch_l2(w_ptr, n, N, K, k_lo, PREFETCH_K: tl.constexpr):
    """Ask L2 for PREFETCH_K bytes of each of the block's weight rows from k_lo, a 128-byte
    line a request (addresses clamped into the matrix; the answer is never read here)."""
    line = k_lo + tl.arange(0, PREFETCH_K // 128) * 128
    ptrs = (w_ptr + tl.minimum(n, N - 1).to(tl.int64)[:, None] * K
            + tl.minimum(line, K - 1)[None, :])
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _load_w(w_rows, k0, k, n_ok, K, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr):
    # Past K the weight must read as zero (x is zero there, and a stray e4m3 NaN times zero
    # is NaN); past N anything finite or not is fine: those rows of acc are never stored.
    if EVEN_K:
        if EVEN_N:
            return tl.load(w_rows + k0 + k[None, :])
        return tl.load(w_rows + k0 + k[None, :], mask=n_ok[:, None], other=0.0)
    return tl.load(w_rows + k0 + k[None, :], mask=n_ok[:, None] & (k0 + k < K)[None, :],
                   other=0.0)


@triton.jit
def _fp8_dot_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K,
                    stride_xm, stride_ym, QUANT_X: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_K: tl.constexpr, XROWS: tl.constexpr, XCHUNK: tl.constexpr,
                    PREFETCH_K: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                    PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_K)
    n_ok = n < N
    m_ok = m < M
    k_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K  # whole tiles a split
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    w_rows = w_ptr + n.to(tl.int64)[:, None] * K  # (BLOCK_N, 1)
    x_rows = x_ptr + m[:, None] * stride_xm  # (BLOCK_M, 1)
    # weights, ahead of the wait: nothing in a step writes them
    w_scale = tl.load(ws_ptr + n, mask=n_ok, other=0.0)
    bias = w_scale  # a placeholder without HAS_BIAS
    if HAS_BIAS:
        bias = tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    if PREFETCH_K > 0:
        _prefetch_l2(w_ptr, n, N, K, k_lo, PREFETCH_K)
    if PDL:
        gdc_wait()  # x comes from the previous kernel (pdl.py)
    if QUANT_X:
        x_scale, x_inv = _row_scales(x_ptr, M, K, stride_xm, BLOCK_M, XROWS, XCHUNK)
    else:
        x_scale = tl.load(xs_ptr + m, mask=m_ok, other=0.0)
        x_inv = x_scale  # a placeholder: x is e4m3 already
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = _load_w(w_rows, k0, k, n_ok, K, EVEN_N, EVEN_K)  # (BLOCK_N, BLOCK_K) e4m3
        x_ok = m_ok[:, None] if EVEN_K else m_ok[:, None] & (k0 + k < K)[None, :]
        x = tl.load(x_rows + k0 + k[None, :], mask=x_ok, other=0.0)  # (BLOCK_M, BLOCK_K)
        if QUANT_X:  # as _fp8_rows_kernel, to the bit
            x = to_e4m3(x, x_inv[:, None])
        # fp32 adds between tiles: a QGMMA chain accumulates with fewer mantissa bits
        acc = tl.dot(w, tl.trans(x), acc, max_num_imprecise_acc=BLOCK_K)
    if SPLIT_K > 1:
        tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + m[None, :]  # (BLOCK_N, BLOCK_M)
        part = part_ptr + pid_n * (SPLIT_K * BLOCK_N * BLOCK_M) + tile
        tl.store(part + pid_k * (BLOCK_N * BLOCK_M), acc, mask=m_ok[None, :])
        tl.debug_barrier()  # every thread's partial is written before the release below
        if tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
            acc = tl.load(part, mask=m_ok[None, :], other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):  # .cg: from L2, never a stale L1 line
                acc += tl.load(part + s * (BLOCK_N * BLOCK_M), mask=m_ok[None, :], other=0.0,
                               cache_modifier=".cg")
            tl.store(cnt_ptr + pid_n, 0)  # zero for the next launch
            _store_y(acc, x_scale, w_scale, bias, y_ptr, n, n_ok, m, m_ok, stride_ym, HAS_BIAS)
    else:
        _store_y(acc, x_scale, w_scale, bias, y_ptr, n, n_ok, m, m_ok, stride_ym, HAS_BIAS)


@triton.jit
def _store_y(acc, x_scale, w_scale, bias, y_ptr, n, n_ok, m, m_ok, stride_ym,
             HAS_BIAS: tl.constexpr):
    """y[m, n] = acc[n, m] * sx[m] * sw[n] (+ bias[n]), the reference's order."""
    y = acc * x_scale[None, :] * w_scale[:, None]  # (BLOCK_N, BLOCK_M)
    if HAS_BIAS:
        y += bias[:, None]
    tl.store(y_ptr + m[None, :] * stride_ym + n[:, None], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[None, :] & n_ok[:, None])


@dataclass(frozen=True, slots=True)
class Fp8DotConfig:
    """Launch parameters of fp8_dot_gemv (fp8_dot_gemv_config picks them per shape)."""

    block_n: int = 64  # output channels a program; the wgmma M: a power of two >= 64
    block_k: int = 256  # K a step: one cp.async stage is block_n * block_k weight bytes
    split_k: int = 1  # programs along K per column block, summed in-kernel (docstring)
    num_warps: int = 4  # 4: one warpgroup; 8: two, for block_n >= 128
    num_stages: int = 4  # cp.async stages: num_stages - 1 tiles in flight while one computes
    prefetch_k: int = 512  # bytes of each weight row asked of L2 before gdc_wait (0: none)

    def __post_init__(self) -> None:
        if not (_pow2(self.block_n) and self.block_n >= 64 and _pow2(self.block_k)
                and self.block_k >= 128):
            raise ValueError(f"block_n a power of two >= 64 (the wgmma M), block_k >= 128 (a "
                             f"128-byte swizzled row): {self}")
        if self.split_k < 1 or self.num_stages < 1 or self.num_warps not in (4, 8):
            raise ValueError(f"split_k, num_stages >= 1, num_warps 4 or 8: {self}")
        if self.prefetch_k and not (_pow2(self.prefetch_k) and self.prefetch_k >= 128):
            raise ValueError(f"prefetch_k 0 or a power of two >= 128 (lines of 128 B): {self}")


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


H200_SMS = 132


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return H200_SMS  # the interpreter: as on the H200
    return torch.cuda.get_device_properties(device).multi_processor_count


def fp8_dot_gemv_config(n: int, k: int, num_sms: int = H200_SMS) -> Fp8DotConfig:
    """Defaults reasoned from the H200 and the compiled kernel (not yet swept: run
    scripts/bench_quant_gemv.py). The budget: 4.8 TB/s over 132 SMs is 36 GB/s an SM, which
    at ~1 us of loaded latency needs ~36 KB of weights in flight per SM.

      - 64 channels, 4 warps, 16 KB tiles (64 x 256), 4 stages: 48 KB in flight, 94 KB of
        shared memory, so two programs an SM; ~230 instructions a thread a tile (a third of
        them quantizing the padded x tile), ~30% of the issue slots at that rate.
      - N >= 16384 (gate_up, lm_head): 128 channels, 8 warps, 16 KB tiles (128 x 128), 80 KB:
        gate_up's 224 programs all resident at once (two an SM) where 448 of 64 channels
        would run as 1.7 waves, and half the x work a weight byte.
      - column blocks too few for the SMs split along K, doubling while the programs stay
        within two an SM (all resident) and each split keeps >= 4 tiles.
      - prefetch_k 512: each program's first 2-4 tiles head for L2 during the PDL wait.

    num_sms: fp8_dot_gemv passes the device's.

    Llama-3.1-8B:                 blocks  split  programs  tiles each
        qkv       6144 x  4096        96      2       192           8
        o         4096 x  4096        64      4       256           4
        gate_up  28672 x  4096       224      1       224          32
        down      4096 x 14336        64      4       256          14
        lm_head 128256 x  4096      1002      1      1002          32
    """
    if n >= 16384:
        return Fp8DotConfig(block_n=128, block_k=128, split_k=1, num_warps=8, num_stages=4)
    block_n, block_k = 64, 256
    blocks = triton.cdiv(n, block_n)
    tiles = triton.cdiv(k, block_k)
    split = 1
    while split < 8 and blocks * split <= num_sms and tiles // (split * 2) >= 4:
        split *= 2  # to at most two programs an SM
    return Fp8DotConfig(block_n=block_n, block_k=block_k, split_k=split, num_warps=4,
                        num_stages=4)


# Split-K workspace per device: (partials fp32, counters int32 kept at zero between launches).
# Never freed nor shrunk: a captured CUDA graph keeps the addresses it was captured with.
_WORKSPACE: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def _workspace(device: torch.device, floats: int, blocks: int) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    held = _WORKSPACE.setdefault(device, [])
    if not held or held[-1][0].numel() < floats or held[-1][1].numel() < blocks:
        # first use happens in the eager warm-up pass ahead of graph capture
        held.append((torch.empty(max(floats, 1 << 20), dtype=torch.float32, device=device),
                     torch.zeros(max(blocks, 4096), dtype=torch.int32, device=device)))
    return held[-1]


def fp8_dot_gemv(x: torch.Tensor, x_scale: torch.Tensor | None, wq: torch.Tensor,
                 w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                 config: Fp8DotConfig | None = None) -> torch.Tensor:
    """x (M <= 16, K), last dim contiguous: half precision (quantized per row in the kernel,
    x_scale None) or e4m3 with float32 per-row scales x_scale (M,); wq (N, K) e4m3 row-major,
    w_scale (N,) float32, bias (N,) or None -> (M, N) in out_dtype."""
    m, k = x.shape
    n = wq.shape[0]
    assert m <= BLOCK_M and x.stride(-1) == 1 and wq.is_contiguous()
    assert (x_scale is None) == (x.dtype != torch.float8_e4m3fn)
    cfg = config or fp8_dot_gemv_config(n, k, _num_sms(x.device))
    blocks = triton.cdiv(n, cfg.block_n)
    y = torch.empty(m, n, dtype=out_dtype, device=x.device)
    if cfg.split_k > 1:
        part, cnt = _workspace(x.device, blocks * cfg.split_k * cfg.block_n * BLOCK_M, blocks)
    else:
        part, cnt = w_scale, w_scale  # unused
    _fp8_dot_kernel[(blocks, cfg.split_k)](
        x, x_scale if x_scale is not None else w_scale, wq, w_scale,
        bias if bias is not None else w_scale, y, part, cnt, m, n, k, x.stride(0), y.stride(0),
        QUANT_X=x_scale is None, HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        XROWS=4 * cfg.num_warps, XCHUNK=XCHUNK,  # 64 values a thread a step
        PREFETCH_K=cfg.prefetch_k if x.is_cuda else 0,  # inline PTX: not in the interpreter
        EVEN_N=n % cfg.block_n == 0, EVEN_K=k % cfg.block_k == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(x))
    return y
