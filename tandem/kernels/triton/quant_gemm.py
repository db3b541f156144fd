"""Weight-only quantized matmuls, y = x W^T with W stored as int8 (per-channel scales) or
int4 (group-wise scales, optional zero points), dequantized in the inner loop.

Two kernels, both reading each quantized weight once per program row block:

    gemv   M <= 8 rows (decode): program (n-block, row). acc in fp32 over K tiles, one
           reduction at the end (as kernels/triton/gemv.py). int8 / fp8: the per-channel
           scale multiplies the row sums once; int4: a group at a time, its scale (and zero
           point) a column over the group's partial products.
    gemm   more rows: tiles (BLOCK_M, BLOCK_N, BLOCK_K); the weight tile is dequantized to
           the activation dtype and fed to tl.dot (fp32 accumulate).

Layouts (kernels/reference/quant.py is the spec): int8 qweight (N, K); int4 qweight uint8
(N, K/2), byte j = q[2j] | q[2j+1] << 4, scales (N, K/G) float32, zeros (N, K/G) uint8 or
none (symmetric: q - 8). K must be a multiple of the tiles (`supported` says).

Also here: `quantize_fp8_per_token`, FP8 W8A8's activation quantization in one kernel
(a program per row: amax, scale, cast), ahead of `torch._scaled_mm`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, xs_ptr, N, K, stride_xm, stride_ym,
                 BITS: tl.constexpr, G: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_XSCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    x_row = x_ptr + m * stride_xm
    if BITS == 8:
        k = tl.arange(0, BLOCK_K)
        rows = w_ptr + n.to(tl.int64)[:, None] * K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + k).to(tl.float32)
            # rows past N are masked (no `other`: 0 cannot cast to fp8); never stored
            w = tl.load(rows + k0 + k[None, :], mask=n_ok[:, None])
            acc += w.to(tl.float32) * x[None, :]
        y = tl.sum(acc, 1) * tl.load(s_ptr + n, mask=n_ok, other=0.0)
        if HAS_XSCALE:  # FP8 W8A8: x holds e4m3 values with one scale per row
            y *= tl.load(xs_ptr + m)
    else:
        # One group (G inputs, G/2 bytes per row) per inner step, so its scale and zero are
        # a column: sum_k (q_k - z) x_k s = s * (sum_j lo_j xe_j + hi_j xo_j - z sum_k x_k)
        HALF: tl.constexpr = G // 2
        j = tl.arange(0, HALF)
        rows = w_ptr + n.to(tl.int64)[:, None] * (K // 2)
        srow = n.to(tl.int64) * (K // G)
        acc = tl.zeros([BLOCK_N, HALF], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            for gi in tl.static_range(BLOCK_K // G):
                kg = k0 + gi * G
                b = tl.load(rows + kg // 2 + j[None, :], mask=n_ok[:, None], other=0)
                xe = tl.load(x_row + kg + 2 * j).to(tl.float32)
                xo = tl.load(x_row + kg + 2 * j + 1).to(tl.float32)
                s = tl.load(s_ptr + srow + kg // G, mask=n_ok, other=0.0)
                if HAS_ZERO:
                    z = tl.load(z_ptr + srow + kg // G, mask=n_ok, other=0).to(tl.float32)
                else:
                    z = tl.full([BLOCK_N], 8.0, tl.float32)
                part = ((b & 0xF).to(tl.float32) * xe[None, :] + (b >> 4).to(tl.float32)
                        * xo[None, :] - z[:, None] * (xe + xo)[None, :])
                acc += part * s[:, None]
        y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                 BITS: tl.constexpr, G: tl.constexpr, HAS_ZERO: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
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
                        mask=n_ok[:, None], other=0).to(x.dtype)  # int8 -> exact in bf16
        else:
            HALF: tl.constexpr = BLOCK_K // 2
            j = tl.arange(0, HALF)
            b = tl.load(w_ptr + n.to(tl.int64)[:, None] * (K // 2) + k0 // 2 + j[None, :],
                        mask=n_ok[:, None], other=0)
            q = tl.reshape(tl.join(b & 0xF, b >> 4), [BLOCK_N, BLOCK_K]).to(tl.float32)
            # BLOCK_K == G: one group per tile, one scale (and zero) per row
            g = n.to(tl.int64) * (K // G) + k0 // G
            s = tl.load(s_ptr + g, mask=n_ok, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + g, mask=n_ok, other=0).to(tl.float32)
            else:
                z = tl.full([BLOCK_N], 8.0, tl.float32)
            w = ((q - z[:, None]) * s[:, None]).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    if BITS == 8:
        acc *= tl.load(s_ptr + n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + m.to(tl.int64)[:, None] * stride_ym + n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


GEMV_MAX_ROWS = 8


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bits: int, group_size: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) half precision -> (..., N): x @ dequant(W)^T (+ bias)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, k = x2.shape
    n = qweight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    g = group_size if bits == 4 else k
    common = dict(BITS=bits, G=g, HAS_ZERO=zeros is not None, HAS_BIAS=bias is not None)
    args = (x2, qweight, scales, zeros if zeros is not None else scales,
            bias if bias is not None else scales, y)
    if m <= GEMV_MAX_ROWS:
        args += (scales,)
        common["HAS_XSCALE"] = False
        # From scripts/bench_quant_gemv.py on the H200 (Llama-3.1-8B decode shapes).
        if bits == 8:
            block_n, block_k, stages = 8, 512, 1
        else:
            block_n, block_k, stages = 16, 512 if k % 512 == 0 else g, 3
        _gemv_kernel[(triton.cdiv(n, block_n), m)](
            *args, n, k, x2.stride(0), y.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=4, num_stages=stages, **common)
    else:
        block_m = 16 if m <= 16 else (32 if m <= 32 else (64 if m <= 64 else 128))
        block_n, block_k = 128, (g if bits == 4 else 64)
        _gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            *args, m, n, k, x2.stride(0), y.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, num_warps=8 if block_m >= 64 else 4, num_stages=3, **common)
    return y.reshape(*shape[:-1], n)


def fp8_gemv(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """FP8 W8A8 for a few rows (decode): xq (M <= 8, K) e4m3 with per-row scales, wq (N, K)
    e4m3 with per-channel scales -> (M, N) in out_dtype; sums in fp32, as _scaled_mm."""
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    _gemv_kernel[(triton.cdiv(n, 16), m)](  # the H200 sweep's best (bench_quant_gemv.py)
        xq, wq, w_scale, w_scale, bias if bias is not None else w_scale, y, x_scale, n, k,
        xq.stride(0), y.stride(0), BITS=8, G=k, HAS_ZERO=False, HAS_BIAS=bias is not None,
        HAS_XSCALE=True, BLOCK_N=16, BLOCK_K=512, num_warps=4, num_stages=1)
    return y


def supported(x: torch.Tensor, k: int, bits: int, group_size: int) -> bool:
    """Whether quant_linear handles this input: CUDA half precision, K a multiple of the
    tiles (512 for int8, the group size for int4)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and (k % 512 == 0 if bits == 8 else k % group_size == 0))


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    m = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + m * stride_xm + k0 + k, mask=k0 + k < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    scale = tl.maximum(tl.max(amax, 0), 1e-12) / 448.0
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + m * stride_xm + k0 + k, mask=k0 + k < K, other=0.0)
        q = tl.clamp(x.to(tl.float32) / scale, -448.0, 448.0)
        tl.store(q_ptr + m * K + k0 + k, q.to(q_ptr.dtype.element_ty), mask=k0 + k < K)
    tl.store(s_ptr + m, scale)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> e4m3 q (M, K), float32 scale (M,): kernels/reference/quant.quantize_fp8
    along the last dim, in one kernel."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    _fp8_rows_kernel[(m,)](x, q, s, k, x.stride(0), BLOCK_K=min(4096, triton.next_power_of_2(k)),
                           num_warps=8)
    return q, s
