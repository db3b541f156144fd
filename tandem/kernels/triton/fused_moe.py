"""The mixture-of-experts MLP as two grouped GEMMs: the fast twin of kernels/reference/moe.py,
same signature, any number of tokens, CUDA-graph capturable (no host syncs, shapes known
from T, K and E alone).

Why sort and pad. Token t's K (token, slot) pairs p = t*K + k go to K different experts, so
neither "one token" nor "one expert" is a GEMM tile. Sorting the pairs by expert gives each
expert a contiguous run of rows; padding every run to a multiple of BLOCK_M makes each
M-block belong to exactly one expert, so a program is an ordinary (BLOCK_M x BLOCK_N) GEMM
tile over one expert's weights, and every weight tile is read once per M-block (once in
all at decode sizes, where each expert gets a few rows):

    sorted_ids (rows):  | e0 e0 e0 -- | e2 e2 e2 e2 | e2 -- -- -- | e5 -- -- -- | -1 -1 -- -- |
    block_expert:       |      0      |      2      |      2      |      5      |   E (zeros) |
                        <- BLOCK_M ->                                     then past num_rows: E+1
    (--: padding, the sentinel T*K; -1: pairs of experts on other ranks, run last as a
     pretend expert E whose blocks only write zeros)

The layout is built by three launches (`moe_align`), none of which syncs with the host:
counts <- 0; `_count_kernel` takes each pair's rank within its expert with an atomic add
on counts[expert] (the order within a run is arbitrary and changes nothing: every row is
computed on its own) and fills sorted_ids with the sentinel; `_place_kernel` turns the
counts into padded runs (a cumsum over E+1 values, redone by every program) and writes
each pair to start[e] + rank, and each block's expert. The number of blocks is bounded
without knowing the counts, num_pairs // BLOCK_M + min(E + 1, num_pairs) (each non-empty
run adds at most one partial block), so grids are fixed; blocks past num_rows (expert
E + 1) exit at once.

Then the two GEMMs, each one launch, grid (block, tile of N):

    gate/up  h[row] = silu(x[t] @ gate_e^T) * (x[t] @ up_e^T)       (rows, I)   x.dtype
             gathers its x rows by t = pair // K, two accumulators over H (the gate and the
             up tile of the same columns), SiLU-and-mul in the epilogue: the (rows, 2I)
             intermediate never exists.
    down     buf[pair] = topk_weight[pair] * h[row] @ w2_e^T           (T*K, H)   x.dtype
             written at the pair's own row, so out = buf.view(T, K, H).sum(1) is a plain
             reduction (float32 inside). Not atomics into out: the K adds would land in a
             different order each run (results not bit-reproducible), and out would need a
             float32 buffer and a zeroing pass anyway.

One token (batch-1 decode) skips the layout: its K experts are distinct, so block p is
pair p alone with expert topk_ids[p] (DIRECT). Where gate/up has many tiles a SM
(Mixtral), gate/up and down run as one launch instead (moe_one.py). The K slots are
summed by `sum_slots`, a Triton reduction, so that the whole chain runs under PDL
(pdl.py). (Summing inside the down launch, the last of a tile's K programs adding them
after an arrival counter, measured slower on the H200: 34.1 against ~25 us a Qwen3-30B-A3B
layer at T = 1.)

h is rounded to x.dtype between the launches, as an unfused bf16 MLP rounds it; the
reference keeps it in float32 (the parity tests allow for that).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem import envs
from tandem.kernels.triton.moe_one import MAX_TOP_K, moe_one, one_launch_pays
from tandem.kernels.triton.moe_tiles import _block_rows, _down_tile, _gate_up_tile
from tandem.kernels.triton.pdl import gdc_launch_dependents, gdc_wait, launch_options


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, rank_ptr, sorted_ptr, num_pairs, max_rows, E,
                  CHUNK: tl.constexpr):
    i = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    ok = i < num_pairs
    e = tl.load(ids_ptr + i, mask=ok, other=0).to(tl.int32)
    expert = tl.where(e < 0, E, e)  # -1: the pretend expert E
    rank = tl.atomic_add(counts_ptr + expert, 1, mask=ok, sem="relaxed")  # the old counts
    tl.store(rank_ptr + i, rank, mask=ok)
    tl.store(sorted_ptr + i, num_pairs, mask=i < max_rows)  # padding until placed


@triton.jit
def _place_kernel(ids_ptr, counts_ptr, rank_ptr, sorted_ptr, expert_ptr, num_rows_ptr,
                  num_pairs, max_blocks, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr,
                  CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    ex = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + ex, mask=ex <= E, other=0)  # (E_PAD,) experts 0..E
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)  # one past each run's last row
    start = end - padded
    # pair i -> row start[expert] + rank (a one-hot sum picks start[expert]: (CHUNK, E_PAD))
    i = pid * CHUNK + tl.arange(0, CHUNK)
    ok = i < num_pairs
    e = tl.load(ids_ptr + i, mask=ok, other=0).to(tl.int32)
    expert = tl.where(e < 0, E, e)
    row = tl.sum(tl.where(ex[None, :] == expert[:, None], start[None, :], 0), 1)
    row += tl.load(rank_ptr + i, mask=ok, other=0)
    tl.store(sorted_ptr + row, i, mask=ok)
    # block b -> the number of runs that end at or before its first row (E + 1: past the end)
    b = pid * CHUNK + tl.arange(0, CHUNK)
    before = (end[None, :] <= b[:, None] * BLOCK_M) & (ex[None, :] <= E)
    tl.store(expert_ptr + b, tl.sum(before.to(tl.int32), 1), mask=b < max_blocks)
    if pid == 0:
        tl.store(num_rows_ptr, tl.sum(padded, 0))


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, sorted_ptr, expert_ptr, num_pairs, top_k, E, H, I,
                    stride_xt, stride_we, stride_hm, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                    DIRECT: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # the expert of every block comes from the routing
    pid_m = tl.program_id(0)  # blocks fastest: an expert's blocks share its weight tiles (L2)
    e = tl.load(expert_ptr + pid_m)
    if e >= E or e < 0:  # -1 pairs (down writes their zeros) or past the last block
        return
    rows, pair = _block_rows(sorted_ptr, pid_m, num_pairs, BLOCK_M, DIRECT)
    _gate_up_tile(x_ptr, w_ptr, h_ptr, rows, pair, e, tl.program_id(1), num_pairs, top_k, H, I,
                  stride_xt, stride_we, stride_hm, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)


@triton.jit
def _down_kernel(h_ptr, w_ptr, out_ptr, sorted_ptr, expert_ptr, topk_w_ptr, num_pairs, E, H,
                 I, stride_we, stride_hm, stride_om, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                 DIRECT: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # h from the gate/up launch
    pid_m = tl.program_id(0)
    e = tl.load(expert_ptr + pid_m)
    if e > E:  # past the last block
        return
    if DIRECT and e < 0:  # the -1 pairs of the direct layout
        e = E
    rows, pair = _block_rows(sorted_ptr, pid_m, num_pairs, BLOCK_M, DIRECT)
    _down_tile(h_ptr, w_ptr, out_ptr, topk_w_ptr, rows, pair, e, tl.program_id(1), num_pairs,
               E, H, I, stride_we, stride_hm, stride_om, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K,
               False)


@triton.jit
def _align_small_kernel(ids_ptr, sorted_ptr, expert_ptr, num_rows_ptr, num_pairs, max_rows,
                        max_blocks, E,
                        BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, P_PAD: tl.constexpr,
                        R_PAD: tl.constexpr, B_PAD: tl.constexpr, PDL: tl.constexpr):
    """moe_align in one program, for few pairs (decode): each pair's rank within its expert
    from a (pairs x pairs) comparison instead of atomics, so one launch replaces three."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    i = tl.arange(0, P_PAD)
    ok = i < num_pairs
    e = tl.load(ids_ptr + i, mask=ok, other=0).to(tl.int32)
    expert = tl.where(ok, tl.where(e < 0, E, e), E_PAD)  # E_PAD: no expert (masked pairs)
    ex = tl.arange(0, E_PAD)
    onehot = expert[:, None] == ex[None, :]  # (P_PAD, E_PAD)
    counts = tl.sum(onehot.to(tl.int32), 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, 0)
    start = end - padded
    rank = tl.sum(((expert[:, None] == expert[None, :]) & (i[None, :] < i[:, None])).to(
        tl.int32), 1)
    row = tl.sum(tl.where(onehot, start[None, :], 0), 1) + rank
    r = tl.arange(0, R_PAD)
    tl.store(sorted_ptr + r, num_pairs + tl.zeros_like(r), mask=r < max_rows)  # padding ...
    tl.debug_barrier()  # ... then the pairs over it (one program: a block-wide barrier)
    tl.store(sorted_ptr + row, i, mask=ok)
    b = tl.arange(0, B_PAD)
    before = (end[None, :] <= b[:, None] * BLOCK_M) & (ex[None, :] <= E)
    tl.store(expert_ptr + b, tl.sum(before.to(tl.int32), 1), mask=b < max_blocks)
    tl.store(num_rows_ptr, tl.sum(padded, 0))


@triton.jit
def _topk_softmax_kernel(logits_ptr, w_ptr, ids_ptr, E, stride, K: tl.constexpr,
                         K_PAD: tl.constexpr, E_PAD: tl.constexpr, RENORM: tl.constexpr,
                         PDL: tl.constexpr):
    """One token's routing: softmax over its E logits (float32), the K largest (first index
    on ties), renormalized to sum to 1 if RENORM. One program a token."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    x = tl.load(logits_ptr + t * stride + e, mask=e < E, other=-float("inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, 0))
    p = p / tl.sum(p, 0)
    kk = tl.arange(0, K_PAD)
    weights = tl.zeros([K_PAD], dtype=tl.float32)
    ids = tl.zeros([K_PAD], dtype=tl.int32)
    for k in tl.static_range(K):
        best = tl.max(p, 0)
        idx = tl.min(tl.where(p == best, e, E_PAD), 0)
        weights = tl.where(kk == k, best, weights)
        ids = tl.where(kk == k, idx, ids)
        p = tl.where(e == idx, -1.0, p)
    if RENORM:
        weights = weights / tl.sum(weights, 0)
    tl.store(w_ptr + t * K + kk, weights, mask=kk < K)
    tl.store(ids_ptr + t * K + kk, ids, mask=kk < K)


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """reference/moe.py's select_experts in one launch: (T, E) logits -> (T, K) float32
    weights, (T, K) int32 ids."""
    t, e = router_logits.shape
    weights = torch.empty(t, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=router_logits.device)
    if t:
        _topk_softmax_kernel[(t,)](router_logits, weights, ids, e, router_logits.stride(0),
                                   K=top_k, K_PAD=triton.next_power_of_2(top_k),
                                   E_PAD=triton.next_power_of_2(e), RENORM=renormalize,
                                   num_warps=1 if e <= 128 else 4,
                                   **launch_options(router_logits))
    return weights, ids


@triton.jit
def _sum_slots_kernel(buf_ptr, out_ptr, H, K: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
    """out[t] = sum over k of buf[t * K + k] (float32, rounded once, as torch's sum)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < H
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        acc += tl.load(buf_ptr + (t * K + k) * H + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + c, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_slots(buf: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """(T*K, H) contiguous -> (T, H): buf.view(T, K, H).sum(1), in a launch that takes part
    in the decode chain's PDL (pdl.py)."""
    hidden = buf.shape[1]
    out = torch.empty(num_tokens, hidden, dtype=buf.dtype, device=buf.device)
    block = min(1024, triton.next_power_of_2(hidden))
    _sum_slots_kernel[(num_tokens, triton.cdiv(hidden, block))](
        buf, out, hidden, K=top_k, BLOCK=block, num_warps=4, **launch_options(buf))
    return out


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """Tiles of one fused_moe call; both launches share block_m (the layout's pad unit)."""
    block_m: int  # sorted rows per program, all of one expert
    gate_up: tuple[int, int, int, int]  # (BLOCK_N over I, BLOCK_K over H, num_warps, stages)
    down: tuple[int, int, int, int]  # (BLOCK_N over H, BLOCK_K over I, num_warps, stages)


def moe_config(num_pairs: int, num_experts: int, hidden: int, inter: int,
               direct: bool = False) -> MoEConfig:
    """Tiles from the rows an expert gets on average (T*K/E) and the matrix sizes. Untuned
    first guesses, to be replaced by the H200 sweep of scripts/bench_fused_moe.py:

      rows/expert <= 16 (decode): BLOCK_M 16, the smallest tl.dot tile: a run is mostly
          padding anyway and the launch is a weight stream. Long BLOCK_K steps, 4 stages in
          flight, narrow N tiles (32 gate + 32 up columns) for enough programs at batch 1
          (Qwen3-30B-A3B: 8 experts x 24 tiles).
      <= 64: BLOCK_M 32; <= 256: 64; more (prefill): 128 with 8 warps, 64-wide K steps and
          3 stages (32 KB of smem a stage), where the launch is compute-bound.
      direct (one token): 256-wide K steps in 3 stages, from the H200 sweep of
          scripts/bench_moe_decode.py (bench/results/2026-12-01-h200-moe-decode-9713227:
          Qwen3-30B-A3B 25.9 against 33.2 us a call, Mixtral-8x7B 177.7 against 198.6).
    Tiles shrink to the matrix (>= 16, tl.dot's minimum) for small H or I."""
    avg = num_pairs / max(num_experts, 1)
    if direct:
        cfg = MoEConfig(16, (32, 256, 4, 3), (32, 256, 4, 3) if inter <= 4096
                        else (64, 128, 4, 4))
    elif avg <= 16:
        cfg = MoEConfig(16, (32, 128, 4, 4), (64, 128, 4, 4))
    elif avg <= 64:
        cfg = MoEConfig(32, (64, 64, 4, 4), (64, 64, 4, 4))
    elif avg <= 256:
        cfg = MoEConfig(64, (64, 64, 4, 4), (128, 64, 4, 4))
    else:
        cfg = MoEConfig(128, (64, 64, 8, 3), (128, 64, 8, 3))

    def fit(tile: tuple[int, int, int, int], n: int, k: int) -> tuple[int, int, int, int]:
        cap = lambda b, d: max(16, min(b, triton.next_power_of_2(d)))  # noqa: E731
        return cap(tile[0], n), cap(tile[1], k), tile[2], tile[3]

    return MoEConfig(cfg.block_m, fit(cfg.gate_up, inter, hidden), fit(cfg.down, hidden, inter))


SMALL_ALIGN_PAIRS = 64  # up to this many (token, slot) pairs, one program aligns them


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids (T, K) in [-1, E) -> (sorted_ids (max_rows,) int32: the pair of each row,
    padding = T*K; block_expert (max_blocks,) int32: each block's expert, E for the blocks
    of -1 pairs, E + 1 past the end; num_rows (1,) int32: the padded rows in use)."""
    ids = topk_ids.reshape(-1)
    num_pairs = ids.numel()
    max_blocks = num_pairs // block_m + min(num_experts + 1, num_pairs)
    max_rows = max_blocks * block_m
    e_pad = triton.next_power_of_2(num_experts + 1)
    dev = ids.device
    sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    num_rows = torch.empty(1, dtype=torch.int32, device=dev)
    if num_pairs <= SMALL_ALIGN_PAIRS:  # decode: one launch
        _align_small_kernel[(1,)](ids, sorted_ids, block_expert, num_rows, num_pairs, max_rows,
                                  max_blocks, num_experts, BLOCK_M=block_m, E_PAD=e_pad,
                                  P_PAD=triton.next_power_of_2(num_pairs),
                                  R_PAD=triton.next_power_of_2(max_rows),
                                  B_PAD=triton.next_power_of_2(max_blocks), num_warps=4,
                                  **launch_options(ids))
        return sorted_ids, block_expert, num_rows
    counts = torch.zeros(e_pad, dtype=torch.int32, device=dev)
    rank = torch.empty(num_pairs, dtype=torch.int32, device=dev)
    _count_kernel[(triton.cdiv(max_rows, 256),)](ids, counts, rank, sorted_ids, num_pairs,
                                                 max_rows, num_experts, CHUNK=256)
    chunk = max(16, 8192 // e_pad)  # the one-hot is (chunk, e_pad)
    _place_kernel[(triton.cdiv(max(num_pairs, max_blocks), chunk),)](
        ids, counts, rank, sorted_ids, block_expert, num_rows, num_pairs, max_blocks,
        num_experts, BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk)
    return sorted_ids, block_expert, num_rows


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: MoEConfig | None = None,
              reduce: bool = True) -> torch.Tensor:
    """x (T, H) bf16/fp16; w13 (E, 2I, H); w2 (E, H, I); topk_weights (T, K) float;
    topk_ids (T, K) int32/int64 in [-1, E) -> (T, H) in x.dtype (reference/moe.py), or with
    reduce=False and K > 1 the K weighted expert outputs (T, K, H), for the caller to sum."""
    num_tokens, hidden = x.shape
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    if x.stride(1) != 1:
        x = x.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()  # no-ops for loaded weights
    ids = topk_ids.contiguous()
    # One token: its K experts are distinct, so block p can simply be pair p (expert ids[p])
    # and no layout is built; more tokens may share experts, which the sort groups.
    direct = num_tokens == 1
    if direct and config is None:  # gate/up and down in one launch, where that pays
        mode = envs.moe_one_launch()
        if top_k <= MAX_TOP_K and (mode == "always" or (
                mode == "auto" and one_launch_pays(top_k, inter, x.device))):
            return _slots(moe_one(x, w13, w2, topk_weights, ids), num_tokens, top_k, reduce)
    cfg = config or moe_config(num_pairs, num_experts, hidden, inter, direct)
    if direct:
        sorted_ids, block_expert = ids, ids.view(-1)  # sorted_ids unused
    else:
        sorted_ids, block_expert, _ = moe_align(ids, num_experts, cfg.block_m)
    max_blocks = block_expert.numel()
    pdl = launch_options(x)
    h = torch.empty(num_pairs if direct else sorted_ids.numel(), inter, dtype=x.dtype,
                    device=x.device)
    bn, bk, warps, stages = cfg.gate_up
    _gate_up_kernel[(max_blocks, triton.cdiv(inter, bn))](
        x, w13, h, sorted_ids, block_expert, num_pairs, top_k, num_experts, hidden, inter,
        x.stride(0), w13.stride(0), h.stride(0), BLOCK_M=cfg.block_m, BLOCK_N=bn, BLOCK_K=bk,
        EVEN_K=hidden % bk == 0, DIRECT=direct, num_warps=warps, num_stages=stages, **pdl)
    buf = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)  # (T*K, H)
    bn, bk, warps, stages = cfg.down
    _down_kernel[(max_blocks, triton.cdiv(hidden, bn))](
        h, w2, buf, sorted_ids, block_expert, topk_weights.contiguous(), num_pairs,
        num_experts, hidden, inter, w2.stride(0), h.stride(0), buf.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=inter % bk == 0, DIRECT=direct,
        num_warps=warps, num_stages=stages, **pdl)
    return _slots(buf, num_tokens, top_k, reduce)


def _slots(buf: torch.Tensor, num_tokens: int, top_k: int, reduce: bool) -> torch.Tensor:
    """The (T*K, H) weighted expert outputs -> (T, H) summed, or (T, K, H) unsummed."""
    if top_k == 1:
        return buf
    if not reduce:
        return buf.view(num_tokens, top_k, buf.shape[-1])
    return sum_slots(buf, num_tokens, top_k)
