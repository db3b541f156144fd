"""The mixture-of-experts MLP for a few (token, slot) pairs (decode): one matrix-vector
product chain per pair, no sorting, no padding, no tensor cores.

At batch 1 each of the K pairs has its own expert, so fused_moe's grouped GEMM pads every
expert's single row to a 16-row tile, needs the align launch first, and runs few programs
(Qwen3-30B-A3B: 8 experts x 24 tiles for 132 SMs). Here every program owns BLOCK_N output
features of one pair and streams that expert's weight rows once, like kernels/triton/
gemv.py:

    gate_up  grid (pairs, I / BLOCK_N):  h[p, n] = silu(x[t] . W1[e, n]) * (x[t] . W3[e, n])
    down     grid (pairs, H / BLOCK_N):  buf[p, n] = topk_weight[p] * (h[p] . W2[e, n])
    (t = p // K, e = topk_ids[p]; a pair of id -1 writes zeros in down)

Same result as fused_moe up to summation order (h rounded to x.dtype between the launches,
as there); out = buf.view(T, K, H).sum(1) as there. Used for at most MAX_PAIRS pairs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# pairs up to which fused_moe takes this path (TANDEM_MOE_GEMV_PAIRS; 0: never, for A/B)
MAX_PAIRS = int(os.environ.get("TANDEM_MOE_GEMV_PAIRS", "16"))


@triton.jit
def _gate_up_gemv_kernel(x_ptr, w_ptr, h_ptr, ids_ptr, top_k, H, I, stride_xt, stride_we,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    p = tl.program_id(0)
    e = tl.load(ids_ptr + p).to(tl.int64)
    if e < 0:  # on another rank: down writes its zeros
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    k = tl.arange(0, BLOCK_K)
    x_row = x_ptr + (p // top_k).to(tl.int64) * stride_xt
    g_rows = w_ptr + e * stride_we + n.to(tl.int64)[:, None] * H  # (BLOCK_N, 1)
    u_rows = g_rows + I * H
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + k
        if EVEN_K:
            x = tl.load(x_row + kk).to(tl.float32)[None, :]
            wg = tl.load(g_rows + kk[None, :], mask=n_ok[:, None], other=0.0)
            wu = tl.load(u_rows + kk[None, :], mask=n_ok[:, None], other=0.0)
        else:
            k_ok = kk < H
            x = tl.load(x_row + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            wg = tl.load(g_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            wu = tl.load(u_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc_g += wg.to(tl.float32) * x
        acc_u += wu.to(tl.float32) * x
    g = tl.sum(acc_g, 1)
    h = g * tl.sigmoid(g) * tl.sum(acc_u, 1)
    tl.store(h_ptr + p.to(tl.int64) * I + n, h.to(h_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _down_gemv_kernel(h_ptr, w_ptr, out_ptr, ids_ptr, topk_w_ptr, H, I, stride_we,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    p = tl.program_id(0)
    e = tl.load(ids_ptr + p).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    out = out_ptr + p.to(tl.int64) * H + n
    if e < 0:
        tl.store(out, tl.zeros([BLOCK_N], dtype=out_ptr.dtype.element_ty), mask=n_ok)
        return
    k = tl.arange(0, BLOCK_K)
    h_row = h_ptr + p.to(tl.int64) * I
    rows = w_ptr + e * stride_we + n.to(tl.int64)[:, None] * I
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        kk = k0 + k
        if EVEN_K:
            a = tl.load(h_row + kk).to(tl.float32)[None, :]
            w = tl.load(rows + kk[None, :], mask=n_ok[:, None], other=0.0)
        else:
            k_ok = kk < I
            a = tl.load(h_row + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            w = tl.load(rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * a
    y = tl.sum(acc, 1) * tl.load(topk_w_ptr + p).to(tl.float32)
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=n_ok)


def _block_k(k: int) -> int:
    """Up to 1024 columns a step, a power of two; an exact divisor of k where one exists."""
    b = min(1024, triton.next_power_of_2(k))
    while b > 64 and k % b:
        b //= 2
    return b if k % b == 0 else min(1024, triton.next_power_of_2(k))


def moe_gemv(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor) -> torch.Tensor:
    """fused_moe's contract (x (T, H); w13 (E, 2I, H); w2 (E, H, I); weights and ids (T, K),
    ids -1 skipped) for T*K <= MAX_PAIRS; w13 and w2 contiguous, x rows contiguous."""
    num_tokens, hidden = x.shape
    inter = w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    pairs = num_tokens * top_k
    ids = topk_ids.reshape(-1).contiguous()
    h = torch.empty(pairs, inter, dtype=x.dtype, device=x.device)
    bk = _block_k(hidden)
    _gate_up_gemv_kernel[(pairs, triton.cdiv(inter, 4))](
        x, w13, h, ids, top_k, hidden, inter, x.stride(0), w13.stride(0), BLOCK_N=4,
        BLOCK_K=bk, EVEN_K=hidden % bk == 0, num_warps=8, num_stages=4)
    buf = torch.empty(pairs, hidden, dtype=x.dtype, device=x.device)
    bk = _block_k(inter)
    _down_gemv_kernel[(pairs, triton.cdiv(hidden, 4))](
        h, w2, buf, ids, topk_weights.reshape(-1).contiguous(), hidden, inter, w2.stride(0),
        BLOCK_N=4, BLOCK_K=bk, EVEN_K=inter % bk == 0, num_warps=8, num_stages=4)
    if top_k == 1:
        return buf
    return buf.view(num_tokens, top_k, hidden).sum(1)
