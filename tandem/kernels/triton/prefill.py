"""Prefill / extend attention: FlashAttention-2 tiling over variable-length chunks whose
earlier tokens may already sit in the paged KV cache (prefix-cache hits, chunked prefill).

Chunk c has query_len new rows, the last ones of its seq_len positions, so row j sits at
absolute position ctx + j with ctx = seq_len - query_len, and sees keys 0 .. ctx + j.
Grid: (num_heads, max query tiles, num_chunks); program (h, t, c) owns BLOCK_M query rows
of one head (heads vary fastest, so the GROUP heads sharing a KV head run side by side and
share its K/V tiles in L2; tiles are taken last-first, so the longest rows start first):

    keys ->      0            n_full          ctx+m0   n_end (exclusive)
    rows m0..    |  full tiles: no mask  |  diagonal tiles: key <= ctx + row   |  (skipped)
    m0+BLOCK_M   |  visible to every row |  and key < seq_len                  |

    n_full = floor((ctx + m0 + 1) / BLOCK_N) * BLOCK_N,  n_end = min(seq_len, ctx + m0 + BLOCK_M)

Per key tile: S = Q (BLOCK_M, D) @ K^T (D, BLOCK_N) on tensor cores (bf16/fp16 in, fp32
out), online softmax in base 2, acc (BLOCK_M, D) += P @ V (BLOCK_N, D). Key n of a chunk is
read from the paged cache at slot block_table[n // block_size] * block_size + n % block_size,
or, when no chunk of the batch has a cached prefix (FRESH), straight from this step's k/v
rows (row query_start + n), which skips the block-table lookups. FRESH rows are contiguous,
so on Hopper (TMA), in eager steps, the Q, K and V tiles come through tensor descriptors:
the copy engine fetches each (rows, head_dim) box with no address arithmetic in the program
(H200, bf16: one 8192-token prompt 1.124 -> 1.070 ms a layer, two of 4096 0.637 -> 0.574;
scripts/bench_prefill_tma.py). Each row's max is taken before the scores' scale, so the
exponent is one FFMA an element: 1.089-1.099 -> 1.045 ms, 0.582 -> 0.567
(bench/results/2026-12-03-h200-twentysecond-ce56946/). A box may run past the chunk into
the next one's rows (or zeros past the last row): those keys are masked, their V rows
zeroed (a non-finite value in another request must not reach this one), and those query
rows are not stored (tests/kernels/test_triton_attention.py poisons a neighbour; it and the
engine GPU tests, 53, passed on an H200 at ee042ad).
TANDEM_PREFILL_TMA=0 turns it off.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tandem import envs
from tandem.kernels.reference import attention as reference_attention
from tandem.kernels.triton.kv_write import load_e4m3

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older Triton: pointer loads only
    TensorDescriptor = None


@triton.jit
def _key_rows(offs, q_start, table, mask, BLOCK_SIZE: tl.constexpr, FRESH: tl.constexpr,
              MASKED: tl.constexpr):
    """Row index of keys offs in the K/V source: this step's k/v rows, or cache slots."""
    if FRESH:
        idx = (q_start + offs).to(tl.int64)
    else:
        if MASKED:
            blk = tl.load(table + offs // BLOCK_SIZE, mask=mask, other=0)
        else:
            blk = tl.load(table + offs // BLOCK_SIZE)
        idx = blk.to(tl.int64) * BLOCK_SIZE + offs % BLOCK_SIZE
    return idx


@triton.jit(do_not_specialize=["stride_bt"])  # per-step width: one variant for all
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, seq_ids_ptr, query_start_loc_ptr,
                    seq_lens_ptr, block_tables_ptr, scale_log2,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, k_scale, v_scale,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_SEQ_IDS: tl.constexpr, FRESH: tl.constexpr, PRECISION: tl.constexpr,
                    PREFETCH: tl.constexpr, FP8: tl.constexpr, FP8_QK: tl.constexpr,
                    TMA: tl.constexpr):
    h = tl.program_id(0)
    tile = tl.program_id(1)
    c = tl.program_id(2)
    if HAS_SEQ_IDS:
        seq = tl.load(seq_ids_ptr + c)
    else:
        seq = c
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    num_tiles = tl.cdiv(q_len, BLOCK_M)
    if tile >= num_tiles:
        return
    m0 = (num_tiles - 1 - tile) * BLOCK_M
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len  # cached prefix before the chunk

    rows = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,) chunk-relative
    row_ok = rows < q_len
    d = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + rows).to(tl.int64)
    if TMA:  # q_ptr, k_ptr, v_ptr are (rows, heads * D) tensor descriptors
        q = q_ptr.load([q_start + m0, h * HEAD_DIM])
    else:
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D)
    if FP8_QK:  # Q in e4m3 too, one scale a row (its amax / 448), S = Q K^T on FP8 cores
        q32 = q.to(tl.float32)
        q_scale = tl.maximum(tl.max(tl.abs(q32), 1), 1e-12) / 448.0
        q = (q32 / q_scale[:, None]).to(tl.float8e4nv)
        s_scale = q_scale * scale_log2  # (BLOCK_M,) the scores' scale, a row at a time
    elif FP8:  # e4m3 -> fp16 is one packed conversion per two values; k_scale is in
        q = q.to(tl.float16)  # scale_log2, v_scale applied to the output
    elif not TMA:  # (tma_fits: q has K's dtype already)
        q = q.to(k_ptr.dtype.element_ty)
    if not FP8_QK:
        s_scale = tl.zeros([BLOCK_M], dtype=tl.float32) + scale_log2
    # s_scale > 0 commutes with max: each row's max is taken before scaling, and exp2's
    # argument s * scale - max is one FFMA an element (FMUL + FFMA when S was scaled first)
    kvh = h // GROUP
    if not TMA:
        k_base = k_ptr + kvh * stride_kh + d[None, :]
        v_base = v_ptr + kvh * stride_vh + d[None, :]
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = ((ctx + m0 + 1) // BLOCK_N) * BLOCK_N
    n_end = tl.minimum(seq_len, ctx + m0 + BLOCK_M)

    # PREFETCH: the next tile's cache rows are looked up one iteration ahead, so the
    # block-table load is off the K/V loads' critical path (H100, paged 8k prompt at
    # (128, 64, 8, 3): 408 TFLOP/s with it, 319 without).
    nxt = _key_rows(tl.arange(0, BLOCK_N), q_start, table, tl.arange(0, BLOCK_N) < n_full,
                    BLOCK_SIZE, FRESH, True)
    for n0 in range(0, n_full, BLOCK_N):  # every key visible to every row: no mask
        offs = n0 + tl.arange(0, BLOCK_N)
        if PREFETCH:
            idx = nxt
            nxt = _key_rows(offs + BLOCK_N, q_start, table, offs + BLOCK_N < n_full,
                            BLOCK_SIZE, FRESH, True)
        else:
            idx = _key_rows(offs, q_start, table, offs < n_full, BLOCK_SIZE, FRESH, False)
        if FP8_QK:  # K stays e4m3: straight into shared memory for the FP8 dot
            k = tl.load(k_base + idx[:, None] * stride_kt)
            v = load_e4m3(v_base + idx[:, None] * stride_vt)
            s = tl.dot(q, tl.trans(k))
        else:
            if TMA:
                k = k_ptr.load([q_start + n0, kvh * HEAD_DIM])
                v = v_ptr.load([q_start + n0, kvh * HEAD_DIM])
            elif FP8:
                k = load_e4m3(k_base + idx[:, None] * stride_kt)
                v = load_e4m3(v_base + idx[:, None] * stride_vt)
            else:
                k = tl.load(k_base + idx[:, None] * stride_kt)  # (BLOCK_N, D)
                v = tl.load(v_base + idx[:, None] * stride_vt)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (M, N), unscaled
        m_new = tl.maximum(m_i, tl.max(s, 1) * s_scale)
        pr = tl.exp2(s * s_scale[:, None] - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    for n0 in range(n_full, n_end, BLOCK_N):  # the diagonal: causal mask, shifted by ctx
        offs = n0 + tl.arange(0, BLOCK_N)
        key_ok = offs < seq_len
        idx = _key_rows(offs, q_start, table, key_ok, BLOCK_SIZE, FRESH, True)
        if FP8_QK:  # masked rows read as 0 (+0.0 in e4m3): no NaN from stale bytes
            kb = tl.load((k_base + idx[:, None] * stride_kt).to(tl.pointer_type(tl.uint8)),
                         mask=key_ok[:, None], other=0)
            k = kb.to(tl.float8e4nv, bitcast=True)
            v = load_e4m3(v_base + idx[:, None] * stride_vt, key_ok[:, None])
            s = tl.dot(q, tl.trans(k))
        else:
            if TMA:  # past seq_len: the next chunk's rows (or zeros). Their scores are
                # masked below and their V rows zeroed here: 0 * inf is NaN, and another
                # request's non-finite value must not reach this one
                k = k_ptr.load([q_start + n0, kvh * HEAD_DIM])
                v = v_ptr.load([q_start + n0, kvh * HEAD_DIM])
                v = tl.where(key_ok[:, None], v, tl.zeros_like(v))
            elif FP8:  # masked rows read as 0: no NaN from stale bytes
                k = load_e4m3(k_base + idx[:, None] * stride_kt, key_ok[:, None])
                v = load_e4m3(v_base + idx[:, None] * stride_vt, key_ok[:, None])
            else:
                k = tl.load(k_base + idx[:, None] * stride_kt, mask=key_ok[:, None],
                            other=0.0)
                v = tl.load(v_base + idx[:, None] * stride_vt, mask=key_ok[:, None],
                            other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        visible = (offs[None, :] <= ctx + rows[:, None]) & key_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        # finite: key n_full <= ctx + m0 is visible
        m_new = tl.maximum(m_i, tl.max(s, 1) * s_scale)
        pr = tl.exp2(s * s_scale[:, None] - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(pr, 1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    if FP8:
        o *= v_scale
    dst = out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def prefill_config(head_dim: int, dtype: torch.dtype,
                   fresh: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a head size, K/V dtype and source.

    H100, bf16, 8k causal prompt, 32/8 heads of 128 (bench/kernels/attention_bench.py
    --sweep): fresh k/v 465 TFLOP/s at (128, 128, 8, 3) vs 441 at (128, 64, 8, 3); paged
    cache with the block-table prefetch 408 at (128, 64, 8, 3) vs 385 at (128, 128, 8, 3).
    An FP8 cache (H200, two 4096-token prompts, scripts/bench_prefill_fp8.py): 128-key
    tiles, 0.700 ms at (128, 128, 8, 3) against 0.846 at (128, 64, 8, 3) with Q K^T in FP8,
    0.870 against 1.004 with fp16 operands.
    """
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if dtype == torch.float8_e4m3fn and head_dim >= 128:
        return 128, 128, 8, 3
    if head_dim >= 128:
        return (128, 128, 8, 3) if fresh else (128, 64, 8, 3)
    return 128, 64, 4, 3


def prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, scale: float, max_query_len: int,
                      seq_ids: torch.Tensor | None = None, num_chunks: int | None = None,
                      key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                      config: tuple[int, int, int, int] | None = None,
                      prefetch_table: bool = True,
                      kv_scale: tuple[float, float] = (1.0, 1.0),
                      fp8_qk: bool | None = None, tma: bool | None = None) -> None:
    """out rows of each chunk (all sequences, or those in seq_ids: (num_chunks,) int32) =
    causal attention over its paged context.

    query, out: (num_tokens, num_heads, head_dim), last dim contiguous.
    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim), contiguous.
    key, value: (num_tokens, num_kv_heads, head_dim), this step's K/V rows; pass them only
    when every chunk launched has no cached prefix (query_len == seq_len).
    max_query_len: a host bound on the chunks' query_len; it sizes the grid only.
    fp8_qk: with an FP8 cache, Q K^T in e4m3 on FP8 tensor cores (Q scaled a row at a
    time); default `reference.attention.fp8_prefill_query`, the spec's rule.
    tma: fetch a fresh batch's tiles through tensor descriptors (default: where
    `tma_fits`, outside CUDA graph capture, unless TANDEM_PREFILL_TMA=0).
    """
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_heads = query.shape[1]
    if num_chunks is None:
        num_chunks = seq_ids.shape[0] if seq_ids is not None else seq_lens.shape[0]
    if num_chunks == 0:
        return
    fresh = key is not None
    if fresh:
        k_src, v_src = key, value
        if k_src.stride(-1) != 1 or v_src.stride(-1) != 1:
            k_src, v_src = k_src.contiguous(), v_src.contiguous()
        k_strides = (k_src.stride(0), k_src.stride(1))
        v_strides = (v_src.stride(0), v_src.stride(1))
    else:
        k_src, v_src = kv_cache[0], kv_cache[1]  # slot stride Hkv*D, head stride D
        k_strides = v_strides = (num_kv_heads * head_dim, head_dim)
    block_m, block_n, num_warps, num_stages = config or prefill_config(head_dim, k_src.dtype,
                                                                       fresh)
    grid = (num_heads, triton.cdiv(max_query_len, block_m), num_chunks)
    fp8 = k_src.dtype == torch.float8_e4m3fn
    fp8_qk = fp8 and (reference_attention.fp8_prefill_query(head_dim) if fp8_qk is None
                      else fp8_qk)
    if tma is None:  # not while a CUDA graph is captured (short prefills): unmeasured there
        tma = (fresh and envs.prefill_tma() and tma_fits(query, k_src, v_src)
               and not torch.cuda.is_current_stream_capturing())
    elif tma and not (fresh and tma_fits(query, k_src, v_src)):
        raise ValueError("tma=True needs a fresh batch (key and value given) that tma_fits")
    srcs = (query, k_src, v_src)
    if tma:
        srcs = (_rows_of_heads(query, block_m), _rows_of_heads(k_src, block_n),
                _rows_of_heads(v_src, block_n))
    _prefill_kernel[grid](
        *srcs, out, seq_ids if seq_ids is not None else seq_lens,
        query_start_loc, seq_lens, block_tables,
        # log2(e): base 2 inside; an FP8 cache's k_scale scales the scores
        scale * 1.4426950408889634 * (float(kv_scale[0]) if fp8 else 1.0),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        *k_strides, *v_strides, block_tables.stride(0), float(kv_scale[0]),
        float(kv_scale[1]),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_SEQ_IDS=seq_ids is not None, FRESH=fresh,
        PRECISION="ieee" if k_src.dtype == torch.float32 else "tf32",
        PREFETCH=prefetch_table and not fresh, FP8=fp8, FP8_QK=fp8_qk, TMA=tma,
        num_warps=num_warps, num_stages=num_stages)


def _rows_of_heads(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A (T, heads, D) tensor as a (T, heads * D) descriptor of (rows, D) boxes: box
    (r, h * D) is rows r.. of head h."""
    d = t.shape[2]
    return TensorDescriptor(t, [t.shape[0], t.shape[1] * d], [t.stride(0), 1], [rows, d])


def tma_fits(*tensors: torch.Tensor) -> bool:
    """Whether (rows, heads, D) tensors can be read as (rows, heads * D) through Hopper
    tensor descriptors: 16-bit CUDA tensors on sm90+, D of 64 or 128 (what was measured
    and tested), heads packed in a row, the row stride and base 16-byte aligned (the copy
    engine's rules)."""
    t = tensors[0]
    if (TensorDescriptor is None or not t.is_cuda or t.shape[2] not in (64, 128)
            or t.dtype not in (torch.bfloat16, torch.float16)
            or not _sm90(t.device.index if t.device.index is not None
                         else torch.cuda.current_device())):
        return False
    return all(x.dtype == t.dtype and x.stride(2) == 1 and x.stride(1) == x.shape[2]
               and x.stride(0) >= x.shape[1] * x.shape[2] and (x.stride(0) * 2) % 16 == 0
               and x.data_ptr() % 16 == 0 for x in tensors)


@functools.lru_cache(maxsize=None)
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)
