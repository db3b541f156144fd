"""The tiles of the mixture-of-experts kernels, shared by fused_moe.py's two launches and
moe_one.py's one: a block of BLOCK_M rows (pairs of one expert) against one BLOCK_N tile of
that expert's weights, as one tensor-core dot per BLOCK_K step (rows padded to 16, tl.dot's
minimum, so one token is a 16-row block holding one real row)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _block_rows(sorted_ptr, pid_m, num_pairs, BLOCK_M: tl.constexpr, DIRECT: tl.constexpr):
    """(rows of h, the pair of each row) of block pid_m: sorted rows, or DIRECT (one token):
    block p is pair p alone, at row p of h (its other BLOCK_M - 1 rows are padding)."""
    r = tl.arange(0, BLOCK_M)
    if DIRECT:
        return pid_m + 0 * r, tl.where(r == 0, pid_m, num_pairs)
    rows = pid_m * BLOCK_M + r
    return rows, tl.load(sorted_ptr + rows)


@triton.jit
def _gate_up_tile(x_ptr, w_ptr, h_ptr, rows, pair, e, pid_n, num_pairs, top_k, H, I,
                  stride_xt, stride_we, stride_hm, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """h[rows, tile pid_n] = silu(x . gate_e) * (x . up_e) for the block's rows (pairs)."""
    row_ok = pair < num_pairs
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of h: gate row n, up row I + n
    n_ok = n < I
    k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (pair // top_k).to(tl.int64)[:, None] * stride_xt + k[None, :]
    g_ptrs = w_ptr + e.to(tl.int64) * stride_we + n[None, :] * H + k[:, None]  # (BK, BN)
    u_ptrs = g_ptrs + I * H
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs + k0, mask=row_ok[:, None], other=0.0)
            wg = tl.load(g_ptrs + k0, mask=n_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs + k0, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = k0 + k < H
            xt = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wg = tl.load(g_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            wu = tl.load(u_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_g = tl.dot(xt, wg, acc_g)
        acc_u = tl.dot(xt, wu, acc_u)
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_hm + n[None, :],
             h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_tile(h_ptr, w_ptr, out_ptr, topk_w_ptr, rows, pair, e, pid_n, num_pairs, E, H, I,
               stride_we, stride_hm, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, H_CG: tl.constexpr):
    """out[pairs, tile pid_n] = topk_weight * (h[rows] . w2_e); zeros for expert E (the
    pairs of other ranks' experts), without reading weights. H_CG: h written by other
    programs of the same launch, read from L2 (never a stale L1 line)."""
    row_ok = pair < num_pairs
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns of out: rows of w2_e
    n_ok = n < H
    out_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_om + n[None, :]
    out_ok = row_ok[:, None] & n_ok[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if e != E:  # other ranks' experts (E) contribute zeros, without reading weights
        k = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + k[None, :]  # (BM, BK)
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + n[None, :] * I + k[:, None]  # (BK, BN)
        for k0 in range(0, I, BLOCK_K):
            if EVEN_K:
                a_ok = row_ok[:, None]
                w = tl.load(w_ptrs + k0, mask=n_ok[None, :], other=0.0)
            else:
                k_ok = k0 + k < I
                a_ok = row_ok[:, None] & k_ok[None, :]
                w = tl.load(w_ptrs + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if H_CG:
                a = tl.load(h_ptrs + k0, mask=a_ok, other=0.0, cache_modifier=".cg")
            else:
                a = tl.load(h_ptrs + k0, mask=a_ok, other=0.0)
            acc = tl.dot(a, w, acc)
        acc *= tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
