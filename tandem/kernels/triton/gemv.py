"""y = x W^T for a single row x (batch-1 decode), bf16/fp16 weights, fp32 accumulation.

A decode step at batch 1 is a chain of matrix-vector products that only need to stream
each weight once. On an H100 (scripts/bench_gemv.py, Llama-3.1-8B shapes, bf16) cuBLAS
reads 2.1-2.9 TB/s (o_proj 15.7 us, QKV 20.2, down 43.5, gate_up 81.4, LM head 376) and
this kernel 2.5-3.2 TB/s (13.3, 18.6, 40.6, 76.4, 331): ~12 us per layer, ~0.4 ms per
token. Each program owns BLOCK_N output features and walks K in BLOCK_K tiles:

    W (N, K) row-major    | rows n0 .. n0+BLOCK_N-1 | x | columns k0 .. k0+BLOCK_K-1 |
    acc[BLOCK_N] += sum_k W[n, k] * x[k]          (fp32), then y[n] = acc (+ bias)

`kernels/ops.linear` sends every single-row half-precision CUDA matmul here; parity with
F.linear is tested in tests/kernels. Batch-1 decode also carries its RMSNorms through here
(carried_norm.py): x may be a NormedRow (the scale multiplies the finished dot) and `add`
gives the output the next norm's epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.reference.carried_norm import AddNorm, NormedRow
from tandem.kernels.triton.carried_norm import (add_args, add_norm_store, norm_args, norm_scale,
                                               normed_row)
from tandem.kernels.triton.pdl import gdc_launch_dependents, gdc_wait, launch_options


@triton.jit
def _gemv_tile(x_ptr, rows, w, k0, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """One tile's products, w (BLOCK_N, BLOCK_K) already loaded: (BLOCK_N, BLOCK_K) fp32."""
    kk = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        x = tl.load(x_ptr + kk)
    else:
        x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
    return w.to(tl.float32) * x.to(tl.float32)[None, :]


@triton.jit
def _load_w(rows, n_ok, k0, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    kk = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        return tl.load(rows + kk[None, :], mask=n_ok[:, None], other=0.0)
    return tl.load(rows + kk[None, :], mask=n_ok[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w, ss_in_ptr, P_in, eps,
                 r_ptr, nw_ptr, s_ptr, ss_ptr, am_ptr,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, NORM_IN: tl.constexpr, P_BLOCK: tl.constexpr,
                 ADD_NORM: tl.constexpr, AMAX_OUT: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    rows = w_ptr + n.to(tl.int64)[:, None] * stride_w
    w = _load_w(rows, n_ok, 0, K, BLOCK_K, EVEN_K)  # the first tile, ahead of the wait
    if PDL:
        gdc_wait()  # x comes from the previous kernel (pdl.py)
    acc = _gemv_tile(x_ptr, rows, w, 0, K, BLOCK_K, EVEN_K)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        acc += _gemv_tile(x_ptr, rows, _load_w(rows, n_ok, k0, K, BLOCK_K, EVEN_K), k0, K,
                          BLOCK_K, EVEN_K)
    y = tl.sum(acc, 1)
    if NORM_IN:
        y *= norm_scale(ss_in_ptr, P_in, K, eps, P_BLOCK)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    if ADD_NORM:
        add_norm_store(y, n, n_ok, pid, r_ptr, nw_ptr, s_ptr, y_ptr, ss_ptr, am_ptr, AMAX_OUT)
    else:
        tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def gemv(x: torch.Tensor | NormedRow, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int, int] | None = None, add: AddNorm | None = None
         ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
    """x (1, K) or (K,) -> (1, N) / (N,): x @ weight.T (+ bias). weight (N, K), last dim
    contiguous. config: (BLOCK_N, BLOCK_K, num_warps, num_stages). x a NormedRow: its scale
    applies; `add`: returns (NormedRow of the next norm, the new residual) instead."""
    x, norm_in, norm_flags = norm_args(x)
    n_out, k_in = weight.shape
    assert x.shape[-1] == k_in and x.numel() == k_in and weight.stride(1) == 1
    block_n, block_k, warps, stages = config or default_config(n_out, k_in)
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], n_out, dtype=x.dtype, device=x.device)
    programs = triton.cdiv(n_out, block_n)
    add_in, add_flags, s, parts = add_args(add, y, programs)
    _gemv_kernel[(programs,)](
        x, weight, bias if bias is not None else weight, y, n_out, k_in, weight.stride(0),
        *norm_in, *add_in, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k_in % block_k == 0, **add_flags, **norm_flags, num_warps=warps,
        num_stages=stages, **launch_options(x))
    return y if add is None else (normed_row(y, parts, add), s)


def default_config(n_out: int, k_in: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): the best of sweeps on the H200 (Llama-3.1-8B
    below; the H100's first sweep picked 4 x 1024, 8 warps for all but down). Shapes with a hidden
    size of 2048 from the H200 sweep of `bench_gemv.py --qwen3` (Qwen3-30B-A3B,
    bench/results/2026-12-01-h200-qwen3-88b4679/gemv-qwen3.log, default -> best): qkv
    5120 x 2048 6.16 -> 5.78 us, o 2048 x 4096 5.19 -> 4.50, router 128 x 2048 1.26 -> 0.97,
    LM head 151936 x 2048 144.8 -> 136.3."""
    if n_out <= 256:  # a router: few rows, one program's worth of K
        return 2, min(2048, triton.next_power_of_2(k_in)), 8, 2
    if k_in <= 2048:
        return (4, 1024, 4, 2) if n_out >= 65536 else (4, 512, 4, 4)
    if n_out <= 2048 and k_in <= 4096:
        return 4, 2048, 8, 4
    # Llama-3.1-8B's shapes from the H200 sweep of `bench_gemv.py` (bench/results/
    # 2026-12-01-h200-gemv-tiles/, default -> best): qkv 6144 x 4096 14.52 -> 12.75 us,
    # o 4096 x 4096 9.90 -> 7.98, gate_up 28672 x 4096 56.05 -> 53.91, LM head 128256 x
    # 4096 240.0 -> 233.5, down 4096 x 14336 27.55 -> 27.51.
    if k_in > 8192:
        return 16, 1024, 8, 3
    if n_out <= 4096:
        return 4, 1024, 4, 2
    if n_out <= 8192:
        return 16, 512, 8, 4
    return (16, 256, 4, 3) if n_out < 65536 else (16, 256, 4, 2)
