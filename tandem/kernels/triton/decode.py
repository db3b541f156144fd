"""Decode attention (query_len == 1) over the paged KV cache: split-K "flash-decoding".

Grid of the main kernel: (num_decodes, num_kv_heads, num_parts). One program owns one
sequence, one KV head and one partition of its context; it loads every K/V row of that
range once and scores it against ALL the query heads of the KV head's group (GQA), padded
to 16 rows so the scores are one tensor-core dot per tile. The partition length is computed
on the device from the sequence's own length, so one grid serves any context:

    part_len = max(MIN_PART, round_up(cdiv(seq_len, num_parts), BLOCK_N))
    context  | part 0 (part_len) | part 1 | ... | part k (k < num_parts) | (seq_len)
    tile     | n0 .. n0+BLOCK_N-1 |   rows gathered through the block table:
               slot(n) = block_table[seq, n // block_size] * block_size + n % block_size

    q  (GROUP_PAD, D)  x  K_tile^T (D, BLOCK_N)  ->  scores (GROUP_PAD, BLOCK_N)
    p  (GROUP_PAD, BLOCK_N)  x  V_tile (BLOCK_N, D)  ->  acc (GROUP_PAD, D), online softmax

With one partition the program writes the normalized output directly. Otherwise each
writes (acc / l, max m, sum l) per head into fp32 scratch, then bumps an arrival counter
of its (sequence, KV head); the program that arrives last merges the partitions by
log-sum-exp and resets the counter to 0 for the next launch (so CUDA graphs replay it). It
merges `merge_width` partitions a round with their loads issued together: the merge is on
the launch's critical path, and one partition a round cost one L2 round trip each (33 at a
long context):

    M = max_p m_p,   w_p = l_p * 2^(m_p - M),   out = sum_p w_p * o_p / sum_p w_p

One kernel per layer, no separate merge launch (which cost ~3 us per layer at batch 1).

With `new` (NewTokens: a decode step whose q and k are not rotated yet and whose K/V are
not in the cache), the launch also does rotary_write_kv's work: every program [norms and]
rotates its group's query, and the program whose partition holds the last position writes
the new token's rotated K and its V to their slot before it reads its tiles (a barrier
orders the block's stores before its loads; no other program reads that position). One
launch a layer fewer; rows of one sequence (a speculative verify step) must not use it.

Lengths come from device tensors (seq_lens, query_start_loc, block_tables); the host sizes
the grid from the batch size (num_parts: enough programs to fill the SMs at batch 1),
capped by max_seq_len / MIN_PART, so the launch can be captured in a CUDA graph. Programs
past a sequence's last partition exit at once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem import envs
from tandem.kernels.triton.elementwise import norm_rotate
from tandem.kernels.triton.kv_write import cached, load_e4m3, load_e4m3_pairs
from tandem.kernels.triton.pdl import gdc_launch_dependents, gdc_wait, launch_options


@triton.jit
def _part_len(seq_len, num_parts, BLOCK_N: tl.constexpr, MIN_PART: tl.constexpr):
    """Context tokens per partition: the sequence split num_parts ways, whole key tiles."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_parts), BLOCK_N) * BLOCK_N, MIN_PART)


@triton.jit
def _new_token(q1, q2, kn_ptr, vn_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr,
               qw_ptr, kw_ptr, row, kvh, holds_last, stride_kt, stride_kh, stride_vt,
               stride_vh, stride_c, eps, k_scale, v_scale, NUM_KV_HEADS: tl.constexpr,
               HEAD_DIM: tl.constexpr, NORM: tl.constexpr, FP8: tl.constexpr):
    """ROPE: what rotary_write_kv does for this program's heads, inside the decode launch.
    Returns the group's query halves q1, q2 (GROUP_PAD, D / 2) [normed and] rotated as
    rotary_write_kv rounds them (the same norm_rotate); the program whose partition holds the
    sequence's last position (holds_last) first writes that token's rotated K and its V to
    their slot, and a barrier makes the stores visible to its own reads of the tile."""
    HALF: tl.constexpr = HEAD_DIM // 2
    dh = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + row)
    cos = tl.load(cos_ptr + pos * stride_c + dh)[None, :]  # first half; the halves are equal
    sin = tl.load(sin_ptr + pos * stride_c + dh)[None, :]
    q1, q2 = norm_rotate(q1, q2, qw_ptr, eps, cos, sin, dh, HALF, NORM)
    if holds_last:
        slot = tl.load(slot_ptr + row).to(tl.int64)
        if slot >= 0:  # (negative: a padding row that writes nothing)
            pk = kn_ptr + row * stride_kt + kvh * stride_kh + dh[None, :]
            k1, k2 = norm_rotate(tl.load(pk), tl.load(pk + HALF), kw_ptr, eps, cos, sin, dh,
                                 HALF, NORM)
            pv = vn_ptr + row * stride_vt + kvh * stride_vh + dh[None, :]
            dst = slot * (NUM_KV_HEADS * HEAD_DIM) + kvh * HEAD_DIM + dh[None, :]
            tl.store(k_ptr + dst, cached(k1, k_scale, k_ptr, FP8))
            tl.store(k_ptr + dst + HALF, cached(k2, k_scale, k_ptr, FP8))
            tl.store(v_ptr + dst, cached(tl.load(pv), v_scale, v_ptr, FP8))
            tl.store(v_ptr + dst + HALF, cached(tl.load(pv + HALF), v_scale, v_ptr, FP8))
    tl.debug_barrier()  # the block's stores above, visible to its loads below
    return q1, q2


@triton.jit
def _merge(part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, i, kvh, row, n_parts, num_parts,
           stride_ot, stride_oh, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
           GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, MERGE: tl.constexpr):
    """The last partition to arrive: the n_parts partial results of the group's heads,
    merged by log-sum-exp and stored. MERGE partitions a round, each round's loads issued
    together (one L2 round trip a round, not one a partition: the merge is on the launch's
    critical path)."""
    g = tl.arange(0, GROUP_P2)  # the group's real heads (the dot's padding is not stored)
    heads = kvh * GROUP + g
    ok_h = g < GROUP
    base = (i * (NUM_KV_HEADS * GROUP) + heads).to(tl.int64) * num_parts  # (G,)
    d = tl.arange(0, HEAD_DIM)
    pp = tl.arange(0, MERGE)
    big = tl.zeros([GROUP_P2], dtype=tl.float32) - float("inf")
    acc = tl.zeros([GROUP_P2, HEAD_DIM], dtype=tl.float32)
    den = tl.zeros([GROUP_P2], dtype=tl.float32)
    for c0 in range(0, n_parts, MERGE):
        part = c0 + pp
        ok = ok_h[:, None] & (part < n_parts)[None, :]  # (G, MERGE)
        off = base[:, None] + part[None, :]
        m = tl.load(part_max_ptr + off, mask=ok, other=0.0, cache_modifier=".cg")
        l = tl.load(part_sum_ptr + off, mask=ok, other=0.0, cache_modifier=".cg")
        o_p = tl.load(part_out_ptr + off[:, :, None] * HEAD_DIM + d[None, None, :],
                      mask=ok[:, :, None], other=0.0, cache_modifier=".cg")  # (G, MERGE, D)
        m = tl.where(l > 0, m, float("-inf"))
        m_new = tl.maximum(big, tl.max(m, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(big - m_safe)
        w = tl.where(l > 0, l * tl.exp2(m - m_safe[:, None]), 0.0)  # (G, MERGE)
        acc = acc * a[:, None] + tl.sum(w[:, :, None] * o_p, 1)
        den = den * a + tl.sum(w, 1)
        big = m_new
    o = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=ok_h[:, None])


@triton.jit
def _slots(table, offs, valid, BLOCK_SIZE: tl.constexpr):
    """Cache slots of context positions offs (invalid ones: slot of block 0, not read)."""
    blk = tl.load(table + offs // BLOCK_SIZE, mask=valid, other=0)
    return blk.to(tl.int64) * BLOCK_SIZE + offs % BLOCK_SIZE


@triton.jit
def _kv_tile(k_ptr, v_ptr, slot, valid, kvh, d, NUM_KV_HEADS: tl.constexpr,
             HEAD_DIM: tl.constexpr, FP8: tl.constexpr):
    """The (BLOCK_N, D) K and V rows at slots, invalid rows 0 (an FP8 cache's as fp16, its
    V as (even dims, odd dims), (BLOCK_N, D / 2) each: load_e4m3_pairs)."""
    off = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kvh * HEAD_DIM + d[None, :]
    if FP8:
        k = load_e4m3(k_ptr + off, valid[:, None])
        HALF: tl.constexpr = HEAD_DIM // 2  # V's rows as 16-bit words, offsets in words
        words = (v_ptr.to(tl.pointer_type(tl.uint16)) + slot[:, None] * (NUM_KV_HEADS * HALF)
                 + kvh * HALF + tl.arange(0, HALF)[None, :])
        v = load_e4m3_pairs(words, valid[:, None])
    else:
        k = tl.load(k_ptr + off, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + off, mask=valid[:, None], other=0.0)
    return k, v


@triton.jit
def _attend(q, k, v, valid, m_i, l_i, acc, scale_log2, PRECISION: tl.constexpr,
            FP8: tl.constexpr):
    """One key tile into the online softmax: scores of the group's queries against k,
    running max m_i and sum l_i, acc += p @ v (the scales apply to the scores, k_scale in
    scale_log2, and to the output). FP8: v and acc are (even dims, odd dims) pairs."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    s = tl.where(valid[None, :], s, float("-inf"))  # (GROUP_PAD, BLOCK_N)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    pr = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(pr, 1)
    if FP8:
        pr = pr.to(tl.float16)
        acc = (acc[0] * alpha[:, None] + tl.dot(pr, v[0]),
               acc[1] * alpha[:, None] + tl.dot(pr, v[1]))
    else:
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


# Per-step integers are not specialized on (==1, %16): one compiled variant serves every
# step, instead of new compilations appearing mid-run as batch shapes change.
@triton.jit(do_not_specialize=["stride_bt", "num_parts"])
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
                   counter_ptr, seq_ids_ptr, query_start_loc_ptr, seq_lens_ptr,
                   block_tables_ptr,
                   scale_log2, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                   num_parts, k_scale, v_scale,
                   pos_ptr, kn_ptr, vn_ptr, slot_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
                   stride_kt, stride_kh, stride_vt, stride_vh, stride_c, eps,
                   NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                   GROUP_P2: tl.constexpr, MERGE: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   MIN_PART: tl.constexpr, HAS_SEQ_IDS: tl.constexpr,
                   PRECISION: tl.constexpr, FP8: tl.constexpr, ROPE: tl.constexpr,
                   NORM: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    p = tl.program_id(2)
    if HAS_SEQ_IDS:
        seq = tl.load(seq_ids_ptr + i)
    else:
        seq = i
    seq_len = tl.load(seq_lens_ptr + seq)
    part_len = _part_len(seq_len, num_parts, BLOCK_N, MIN_PART)
    start = p * part_len
    if start >= tl.maximum(seq_len, 1):  # partition 0 always runs, so padding rows get 0
        return
    end = tl.minimum(start + part_len, seq_len)
    row = tl.load(query_start_loc_ptr + seq).to(tl.int64)

    g = tl.arange(0, GROUP_PAD)  # query heads of this KV head, padded for the dot
    d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + g
    head_ok = g < GROUP
    # q in halves (GROUP_PAD, D / 2) x 2, joined in registers either way, so that the first
    # dot is lowered alike with and without ROPE (from a plain load it may take another
    # MMA path, which rounds otherwise)
    HALF: tl.constexpr = HEAD_DIM // 2
    dh = tl.arange(0, HALF)
    pq = q_ptr + row * stride_qt + heads[:, None] * stride_qh + dh[None, :]
    q1 = tl.load(pq, mask=head_ok[:, None], other=0.0)
    q2 = tl.load(pq + HALF, mask=head_ok[:, None], other=0.0)
    if ROPE:  # q as qkv_proj left it; this step's K/V not in the cache yet
        q1, q2 = _new_token(q1, q2, kn_ptr, vn_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, cos_ptr,
                            sin_ptr, qw_ptr, kw_ptr, row, kvh, end == seq_len, stride_kt,
                            stride_kh, stride_vt, stride_vh, stride_c, eps, k_scale, v_scale,
                            NUM_KV_HEADS, HEAD_DIM, NORM, FP8)
    q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (GROUP_PAD, HEAD_DIM))  # | q1 | q2 |
    if FP8:  # e4m3 -> fp16 is one packed conversion per two values (fp32 was three each);
        q = q.to(tl.float16)  # (a query past fp16's range, 65504, would overflow)
    else:
        q = q.to(k_ptr.dtype.element_ty)

    m_i = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    if FP8:  # the even and the odd dims (_kv_tile)
        acc = (tl.zeros([GROUP_PAD, HEAD_DIM // 2], dtype=tl.float32),
               tl.zeros([GROUP_PAD, HEAD_DIM // 2], dtype=tl.float32))
    else:
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    tile = tl.arange(0, BLOCK_N)
    # The next tile's slots are read a tile ahead and carried, so that the K/V copies depend
    # on no load of their own iteration: only then does Triton's pipeliner give them more
    # than one shared-memory buffer (num_stages - 1) and issue the next tile's copies before
    # this tile's dots. Read in the same iteration, every stage count left one buffer: the
    # copies waited for the dots, and the program for its copies (sm_90 TTGIR, Triton 3.6).
    slot = _slots(table, start + tile, start + tile < end, BLOCK_SIZE)
    for n0 in range(start, end, BLOCK_N):
        valid = n0 + tile < end
        k, v = _kv_tile(k_ptr, v_ptr, slot, valid, kvh, d, NUM_KV_HEADS, HEAD_DIM, FP8)
        ahead = n0 + BLOCK_N + tile
        slot = _slots(table, ahead, ahead < end, BLOCK_SIZE)
        m_i, l_i, acc = _attend(q, k, v, valid, m_i, l_i, acc, scale_log2, PRECISION, FP8)

    if FP8:  # dims interleaved back: column 2j is even's j, 2j + 1 odd's
        acc = tl.reshape(tl.join(acc[0], acc[1]), (GROUP_PAD, HEAD_DIM))
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if FP8:
        o *= v_scale
    dst = out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :]
    n_parts = tl.cdiv(tl.maximum(seq_len, 1), part_len)  # partitions that run for this seq
    if n_parts == 1:  # always so with one partition per launch: nothing to merge
        tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])
    else:
        # scratch (num_decodes, num_heads, num_parts[, D]), fp32
        base0 = (i * (NUM_KV_HEADS * GROUP) + heads).to(tl.int64) * num_parts
        tl.store(part_max_ptr + base0 + p, m_i, mask=head_ok)
        tl.store(part_sum_ptr + base0 + p, l_i, mask=head_ok)
        tl.store(part_out_ptr + (base0 + p)[:, None] * HEAD_DIM + d[None, :], o,
                 mask=head_ok[:, None])
        tl.debug_barrier()  # every thread's stores issued before the release below
        counter = counter_ptr + i * NUM_KV_HEADS + kvh
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == n_parts - 1:  # the last partition merges them all
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
            _merge(part_out_ptr, part_max_ptr, part_sum_ptr, out_ptr, i, kvh, row, n_parts,
                   num_parts, stride_ot, stride_oh, NUM_KV_HEADS, GROUP, GROUP_P2, HEAD_DIM,
                   MERGE)


@dataclass(frozen=True, slots=True)
class NewTokens:
    """A decode step's new tokens before rotary and the K/V write (decode_attention's `new`):
    what kv_write.rotary_write_kv takes, for the decode kernel to do its work."""

    positions: torch.Tensor  # (T,) int64
    key: torch.Tensor  # (T, Hkv, D), unit stride along D (a view of the fused QKV output)
    value: torch.Tensor  # (T, Hkv, D), likewise
    slot_mapping: torch.Tensor  # (T,) int64, negative: write nothing
    cos_cache: torch.Tensor  # (max_pos, D) float32
    sin_cache: torch.Tensor
    q_norm: torch.Tensor | None = None  # (D,) per-head RMSNorm weights (Qwen3), both or none
    k_norm: torch.Tensor | None = None
    eps: float = 1e-6


_MIN_PART = 64  # shortest partition, in tokens: one key tile at BLOCK_N 64
MAX_ROUNDS = 8  # merge rounds at most, where that cap at least halves the partitions


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the Triton interpreter on CPU: any grid works
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_num_partitions(max_seq_len: int, num_seqs: int, num_kv_heads: int,
                          num_sms: int = 132, programs_per_sm: int = 2,
                          min_part: int = _MIN_PART, merge: int | None = None) -> int:
    """Partitions per (sequence, KV head): enough programs for ~programs_per_sm per SM
    (batch 1 still fills the chip), never partitions shorter than min_part tokens; 1 when
    the batch alone fills the chip (no merge kernel then). H100, batch 1, 32k context:
    33 partitions read 2244-2296 GB/s, 66 read 2197-2259, 16 read 1848-1883.

    With `merge` (the merge width), no more than MAX_ROUNDS merge rounds where that cap at
    least halves the count. H200, batch 1 (scripts/bench_decode_attention.py, tenth session,
    two calls): Qwen3-30B-A3B (merge 2) at 4096 tokens took 13.1-13.9 us in 16 partitions
    against 15.0-17.0 in 32 (20.7 in 64, ninth session); Llama-3.1-8B (merge 4) was slower
    capped at 32 than at its 33 (1024 tokens 8.4 against 7.3 us, 8192 18.3 against 16.7-16.9)
    although both split the context alike, so a cap that trims a few is left off."""
    fill = max(1, programs_per_sm * num_sms // max(1, num_seqs * num_kv_heads))
    cap = MAX_ROUNDS * merge if merge else fill
    if 2 * cap > fill:
        cap = fill
    return max(1, min(fill, cap, triton.cdiv(max_seq_len, min_part)))


def merge_width(group: int, head_dim: int) -> int:
    """Partitions the last program merges a round: up to 8, while the round's (group, width,
    head_dim) float32 tile stays within 16 registers a thread (4 warps): at 32 ptxas issued
    the tile's loads in waves, each waiting on the last (sm_90 SASS), at 16 all at once.
    Fixed per model, so no batch shape compiles another variant (rounds past a sequence's
    partitions are masked)."""
    fit = max(1, 2048 // (group * head_dim))
    return min(8, 1 << (fit.bit_length() - 1))


def decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor,
                     query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, scale: float, max_seq_len: int,
                     seq_ids: torch.Tensor | None = None, num_decodes: int | None = None,
                     num_parts: int | None = None,
                     config: tuple[int, int, int] | None = None,
                     kv_scale: tuple[float, float] = (1.0, 1.0),
                     min_part: int | None = None, new: NewTokens | None = None,
                     merge: int | None = None) -> None:
    """out[row] = attention of query[row] over its sequence's paged context, for each
    decode sequence (all sequences, or those listed in seq_ids: (num_decodes,) int32).

    query, out: (num_tokens, num_heads, head_dim), last dim contiguous.
    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim), contiguous.
    max_seq_len: a host bound on the decode sequences' seq_lens; it only caps num_parts.
    num_parts: partitions per (sequence, KV head), default decode_num_partitions(...).
    config: (BLOCK_N, num_warps, num_stages), for tuning; min_part: the shortest partition
    in tokens (default _MIN_PART, an FP8 cache's key tile), for tuning; merge: partitions
    merged a round (a power of two; default merge_width), for tuning.
    new: this step's tokens are not rotated or cached yet (NewTokens): query is q as
    qkv_proj left it, and the launch does rotary_write_kv's work too. Every row must be its
    own sequence (no two rows of one sequence: they would race on each other's K/V).
    """
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    if num_decodes is None:
        num_decodes = seq_ids.shape[0] if seq_ids is not None else seq_lens.shape[0]
    if num_decodes == 0:
        return
    fp32 = kv_cache.dtype == torch.float32
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    # An FP8 cache: 128-key tiles at 3 stages (two tiles in flight), each warp scoring 32
    # keys, and partitions of whole tiles. H200, Llama-3.1-8B's 8 KV heads, us a layer, V read
    # as 16-bit words (twenty-first session, ef8beac,
    # bench/results/2026-12-03-h200-twentyfirst-ef8beac/): batch 256 x 4096 560 at 3 stages,
    # 623 at 2 (the byte-gather kernel before: 672, 694); batch 64 x 4096 171 against 195.
    # At 2 stages batch 1 x 2048 was 7.7 against 8.1 and batch 8 x 1024 10.6 against 11.2,
    # but stages chosen by partition count are two compiled variants, and the second one
    # compiled inside a long run's measurement, in its first mixed step with few decodes:
    # 256 x 4096 / 256 took 35.68 s that way against 34.40 at 3 stages throughout
    # (twenty-second session, bench/results/2026-12-03-h200-twentysecond-c9b5cc3/). So one
    # stage count for any batch. (One warp a 64-key tile took 623 us at batch 256 but 600
    # against 502 at 192, wave quantization at 8 programs an SM: e604a8b.)
    # bf16 at 2 stages since the slots are read a tile ahead (twentieth session, 8273a8d,
    # bench/results/2026-12-03-h200-twentieth-8273a8d/): 956 us at batch 256 x 4096 as
    # before (990 at 3 stages), 3-9% faster at batch 1 (2048 tokens 9.36 against 10.11 us).
    block_n, num_warps, num_stages = config or envs.decode_tiles() or (
        (128, 4, 3) if fp8 else (64 if head_dim >= 128 or fp32 else 128, 4, 2))
    min_part = min_part or envs.decode_min_part() or (block_n if fp8 else _MIN_PART)
    group_p2 = triton.next_power_of_2(group)
    merge = merge or merge_width(group_p2, head_dim)
    if num_parts is None:
        num_parts = decode_num_partitions(max_seq_len, num_decodes, num_kv_heads,
                                          _num_sms(query.device), min_part=min_part,
                                          merge=merge)
    if num_parts == 1:  # the scratch is unused; placeholders of the scratch's own types, so
        # that one compiled variant serves both (a float32 scratch against `out`'s dtype was
        # a second variant, first met in a long run's mixed steps: a compile inside the
        # measurement, scripts/diag_one_time.py)
        part_out = part_max = part_sum = _f32_placeholder(query.device)
        counters = seq_lens
    else:
        counters = _arrival_counters(query.device, num_decodes * num_kv_heads)
        part_out = torch.empty(num_decodes, num_heads, num_parts, head_dim,
                               dtype=torch.float32, device=query.device)
        part_max = torch.empty(num_decodes, num_heads, num_parts, dtype=torch.float32,
                               device=query.device)
        part_sum = torch.empty_like(part_max)
    ids = seq_ids if seq_ids is not None else seq_lens  # placeholder pointer when unused
    if new is not None:
        assert seq_ids is None and head_dim >= 2, "NewTokens: a decode-only step"
        k_new, v_new = new.key, new.value
        assert k_new.stride(-1) == 1 and v_new.stride(-1) == 1 and query.stride(-1) == 1
        rope = (new.positions, k_new, v_new, new.slot_mapping, new.cos_cache, new.sin_cache,
                new.q_norm if new.q_norm is not None else new.cos_cache,
                new.k_norm if new.k_norm is not None else new.cos_cache,
                k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
                new.cos_cache.stride(0), new.eps)
    else:  # placeholders of the types the kernel expects
        rope = (seq_lens, query, query, seq_lens, query, query, query, query, 0, 0, 0, 0, 0,
                1e-6)
    _decode_kernel[(num_decodes, num_kv_heads, num_parts)](
        query, kv_cache[0], kv_cache[1], out, part_out, part_max, part_sum, counters,
        ids, query_start_loc, seq_lens, block_tables,
        # log2(e): the kernel works in base 2; an FP8 cache's k_scale scales the scores
        scale * 1.4426950408889634 * (float(kv_scale[0]) if fp8 else 1.0),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        num_parts, float(kv_scale[0]), float(kv_scale[1]), *rope,
        NUM_KV_HEADS=num_kv_heads, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), GROUP_P2=group_p2,
        MERGE=merge, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, MIN_PART=min_part,
        HAS_SEQ_IDS=seq_ids is not None,
        PRECISION="ieee" if kv_cache.dtype == torch.float32 else "tf32",
        FP8=fp8, ROPE=new is not None, NORM=new is not None and new.q_norm is not None,
        num_warps=num_warps, num_stages=num_stages, **launch_options(query))


_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}
_PLACEHOLDERS: dict[torch.device, torch.Tensor] = {}


def _f32_placeholder(device: torch.device) -> torch.Tensor:
    """A float32 tensor standing in for unused scratch (kept: graphs capture its address)."""
    if device not in _PLACEHOLDERS:
        _PLACEHOLDERS[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return _PLACEHOLDERS[device]


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters, one per (sequence, KV head), left zeroed by every launch.
    Grown by allocating a larger buffer; old ones are kept alive, since CUDA graphs captured
    earlier still point at them."""
    buffers = _COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < n:
        buffers.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return buffers[-1]
