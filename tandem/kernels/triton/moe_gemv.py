"""Batch-1 mixture of experts as matrix-vector products: one token's K (token, slot) pairs,
each against its own expert, no tensor cores, no padding (fused_moe's DIRECT layout pads
every pair to a 16-row tile). Like kernels/triton/gemv.py, a program owns BLOCK_N output
features and streams their weight rows in BLOCK_K steps:

    gate_up  grid (K, I / BLOCK_N):  h[p, n] = silu(x . W1[e, n]) * (x . W3[e, n])
    down     grid (K, H / BLOCK_N):  buf[p, n] = topk_weight[p] * (h[p] . W2[e, n])
             (e = topk_ids[p]; a pair of id -1, an expert on another rank, writes zeros)

then out = fused_moe.sum_slots(buf). Same rounding as fused_moe: h is computed in float32
and rounded once to x's dtype. Every launch takes part in PDL (pdl.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.triton.pdl import gdc_launch_dependents, gdc_wait, launch_options


@triton.jit
def _gate_up_gemv_kernel(x_ptr, w_ptr, h_ptr, ids_ptr, H, I, stride_we,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                         PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # the expert comes from the routing
    p = tl.program_id(0)
    e = tl.load(ids_ptr + p).to(tl.int64)
    if e < 0:  # on another rank: down writes its zeros
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    k = tl.arange(0, BLOCK_K)
    g_rows = w_ptr + e * stride_we + n.to(tl.int64)[:, None] * H
    u_rows = g_rows + I * H
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + k
        if EVEN_K:
            x = tl.load(x_ptr + kk).to(tl.float32)[None, :]
            wg = tl.load(g_rows + kk[None, :], mask=n_ok[:, None], other=0.0)
            wu = tl.load(u_rows + kk[None, :], mask=n_ok[:, None], other=0.0)
        else:
            k_ok = kk < H
            x = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            wg = tl.load(g_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            wu = tl.load(u_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc_g += wg.to(tl.float32) * x
        acc_u += wu.to(tl.float32) * x
    g = tl.sum(acc_g, 1)
    h = g * tl.sigmoid(g) * tl.sum(acc_u, 1)
    tl.store(h_ptr + p.to(tl.int64) * I + n, h.to(h_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _down_gemv_kernel(h_ptr, w_ptr, out_ptr, ids_ptr, topk_w_ptr, H, I, stride_we,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                      PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # h from the gate/up launch
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


Tile = tuple[int, int, int, int]  # (BLOCK_N, BLOCK_K, num_warps, num_stages)


def default_tiles(hidden: int, inter: int) -> tuple[Tile, Tile]:
    """(gate_up, down) tiles; first guesses, like gemv.default_config."""
    return (4, 1024, 8, 4), (16 if inter > 4096 else 8, 256, 4, 4)


def moe_gemv(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor, tiles: tuple[Tile, Tile] | None = None) -> torch.Tensor:
    """fused_moe's contract for one token: x (1, H) half precision, w13 (E, 2I, H), w2
    (E, H, I) contiguous, topk_weights / topk_ids (1, K) -> (1, H)."""
    from tandem.kernels.triton.fused_moe import sum_slots

    num_tokens, hidden = x.shape
    assert num_tokens == 1 and x.stride(1) == 1
    inter = w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    ids = topk_ids.reshape(-1).contiguous()
    (gbn, gbk, gw, gs), (dbn, dbk, dw, ds) = tiles or default_tiles(hidden, inter)
    pdl = launch_options(x)
    h = torch.empty(top_k, inter, dtype=x.dtype, device=x.device)
    _gate_up_gemv_kernel[(top_k, triton.cdiv(inter, gbn))](
        x, w13, h, ids, hidden, inter, w13.stride(0), BLOCK_N=gbn, BLOCK_K=gbk,
        EVEN_K=hidden % gbk == 0, num_warps=gw, num_stages=gs, **pdl)
    buf = torch.empty(top_k, hidden, dtype=x.dtype, device=x.device)
    _down_gemv_kernel[(top_k, triton.cdiv(hidden, dbn))](
        h, w2, buf, ids, topk_weights.reshape(-1).contiguous(), hidden, inter, w2.stride(0),
        BLOCK_N=dbn, BLOCK_K=dbk, EVEN_K=inter % dbk == 0, num_warps=dw, num_stages=ds, **pdl)
    return buf if top_k == 1 else sum_slots(buf, 1, top_k)
