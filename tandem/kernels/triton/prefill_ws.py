"""Prefill attention for fresh prompts on Hopper, warp-specialized: prefill.py's TMA path
with its key loop split by Triton into a producer warp group (the TMA loads) and two
consumer warp groups of 64 query rows each, which synchronize only through the loads'
mbarriers and their own named barriers. One group's softmax then runs under the other's
wgmma.

Why: in prefill.py's kernel every TMA load sits between CTA-wide barriers, so the two warp
groups of a program march in lockstep and each tile costs its tensor-core time plus its
exp2 time (about 2,048 + 1,024 cycles for 128 x 128 on an H200: the 0.67 of the matmul rate
it reaches). This kernel is the same arithmetic (FlashAttention-2 tiling, the row max before
the scale, base-2 exponent), reorganized so the two can overlap.

What Triton 3.6's warp-specialization pass accepts, found by compiling for sm_90: a
single key loop (`tl.range(..., warp_specialize=True)`) at num_warps=4. An early `return`
or a second loop for the diagonal tile makes the pass fail (an assertion in its task-id
propagation, or a dominance error); a causal mask under an `if` compiles without
specialization. So every tile is masked (key <= row and key < query_len), and a program
past its chunk's last tile runs no iteration and stores nothing.

Keys past a chunk's end are read from the rows after it: the next chunk's, or past the last
row, zeros (the descriptor's bounds). Their scores are masked, but P V would still multiply
their V rows by zero, and 0 x inf is NaN: another request's non-finite value must not reach
this one. So the kernel runs only where no tile crosses into another chunk: every chunk's
length a multiple of BLOCK_N, or the chunk last in the step's rows
(AttentionMetadata.tiles_stay_in_chunks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128  # BLOCK_M = BLOCK_N: the tiles measured (head_dim 128)


@triton.jit
def _update(s, scale_log2, m_i, l_i, acc, v):
    """One key tile of the online softmax: s (M, N) raw scores, v (N, D)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
    p = tl.exp2(s * scale_log2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _prefill_ws_kernel(q_desc, k_desc, v_desc, out_ptr, seq_ids_ptr, query_start_loc_ptr,
                       scale_log2, stride_ot, stride_oh, GROUP: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_SEQ_IDS: tl.constexpr):
    h = tl.program_id(0)
    tile = tl.program_id(1)
    c = tl.program_id(2)
    if HAS_SEQ_IDS:
        seq = tl.load(seq_ids_ptr + c)
    else:
        seq = c
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    # tiles last-first (the longest rows start first); past the last tile m0 < 0: no keys,
    # nothing stored (no early return: see the module docstring)
    m0 = (tl.cdiv(q_len, BLOCK_M) - 1 - tile) * BLOCK_M
    kvh = h // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    q = q_desc.load([q_start + m0, h * HEAD_DIM])
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_end = tl.minimum(q_len, m0 + BLOCK_M)
    for n0 in tl.range(0, n_end, BLOCK_N, warp_specialize=True):
        offs = n0 + tl.arange(0, BLOCK_N)
        k = k_desc.load([q_start + n0, kvh * HEAD_DIM])
        s = tl.dot(q, tl.trans(k))  # (M, N), unscaled
        s = tl.where((offs[None, :] <= rows[:, None]) & (offs < q_len)[None, :], s,
                     float("-inf"))
        v = v_desc.load([q_start + n0, kvh * HEAD_DIM])
        m_i, l_i, acc = _update(s, scale_log2, m_i, l_i, acc, v)
    o = acc / l_i[:, None]
    d = tl.arange(0, HEAD_DIM)
    dst = (out_ptr + (q_start + rows).to(tl.int64)[:, None] * stride_ot + h * stride_oh
           + d[None, :])
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=((rows >= 0) & (rows < q_len))[:, None])


def prefill_ws(q_desc, k_desc, v_desc, out: torch.Tensor, query_start_loc: torch.Tensor,
               scale_log2: float, max_query_len: int, num_chunks: int, group: int,
               seq_ids: torch.Tensor | None) -> None:
    """Launch on descriptors of (rows, BLOCK) boxes built by prefill.prefill_attention (which
    checks everything else: a fresh 16-bit batch, head_dim 128, sm_90)."""
    num_heads, head_dim = out.shape[1], out.shape[2]
    grid = (num_heads, triton.cdiv(max_query_len, BLOCK), num_chunks)
    _prefill_ws_kernel[grid](
        q_desc, k_desc, v_desc, out, seq_ids if seq_ids is not None else query_start_loc,
        query_start_loc, scale_log2, out.stride(0), out.stride(1), GROUP=group,
        HEAD_DIM=head_dim, BLOCK_M=BLOCK, BLOCK_N=BLOCK, HAS_SEQ_IDS=seq_ids is not None,
        num_warps=4, num_stages=2)
