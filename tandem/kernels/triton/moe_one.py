"""One token's mixture-of-experts MLP in one launch (batch-1 decode): gate/up and down.

fused_moe's one-token path runs two launches, gate/up then down. Each streams its weights
(Qwen3-30B-A3B: 50 MB, then 25 MB a layer), and between them the chip drains the first
launch's last wave, then ramps the second up from nothing. Here both are tiles of one grid,
and a down tile of pair p starts as soon as p's h is complete, while other pairs' gate/up
tiles still stream:

    tickets 0 .. K*T1-1          gate/up tile (pair p, BN1 columns of h):
                                 h[p, n] = silu(x . gate_e[n]) * (x . up_e[n]);
                                 then ready[p] += 1 (release)
    tickets K*T1 .. K*(T1+T2)-1  down tile (pair p, BN2 rows of out): wait until
                                 ready[p] == T1 (acquire), then
                                 out[p, n] = topk_weight[p] * (w2_e[n] . h[p])

Why tickets, not program ids. A waiting down tile holds its SM slot, so it must never wait
for a gate/up tile that has not started. Each program takes its tile from an atomic ticket
counter when it starts: every gate/up ticket went to a program that was already running,
and gate/up tiles never wait, so every wait ends (the same argument as a decoupled
look-back scan's). The last program to finish resets the counters, so every launch finds
them zeroed (CUDA graphs replay it as is).

The tiles are the two-launch path's own (moe_tiles.py: one token padded to a 16-row
tensor-core block, float32 accumulation), h rounded to x.dtype between the phases as
there, and the K weighted outputs left unsummed in (K, H) like there. Experts outside
[0, E) (other ranks' under expert parallelism) contribute zeros without reading weights.
(Matrix-vector tiles without tensor cores streamed slower: Mixtral 192.9 against 168.5 us.)

Where it pays (one H200, scripts/bench_moe_decode.py and `tandem bench latency`, e023f66):
Mixtral-8x7B, whose gate/up alone is 896 tiles (6.8 a SM), 168.5 against 177.2 us a call and
6.71 against 7.34 ms a token; Qwen3-30B-A3B, 192 tiles (1.5 a SM), 25.4 against 24.8 us and
2.68 against 2.59 ms a token: each program's ticket is an L2 round trip before its first
load, and with few tiles a SM there is little tail to save. `one_launch_pays` picks by
that count; TANDEM_MOE_ONE_LAUNCH=1 / 0 forces one launch / two.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tandem import envs
from tandem.kernels.triton.decode import _num_sms
from tandem.kernels.triton.moe_tiles import _block_rows, _down_tile, _gate_up_tile
from tandem.kernels.triton.pdl import gdc_launch_dependents, gdc_wait, launch_options


@triton.jit
def _moe_one_kernel(x_ptr, w13_ptr, w2_ptr, h_ptr, out_ptr, ids_ptr, topk_w_ptr, sync_ptr,
                    E, H, I, top_k, T1, T2, stride_w13, stride_w2,
                    BN1: tl.constexpr, BK1: tl.constexpr, BN2: tl.constexpr,
                    BK2: tl.constexpr, EVEN_H: tl.constexpr, EVEN_I: tl.constexpr,
                    PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # x, the routing, and the counters' last reset come before
    # sync: [ticket, finished, ready[0 .. top_k)]
    ticket = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
    num_up = top_k * T1
    if ticket < num_up:  # gate/up
        p = ticket // T1
        e = tl.load(ids_ptr + p)
        rows, pair = _block_rows(ids_ptr, p, top_k, 16, True)
        if (e >= 0) & (e < E):
            _gate_up_tile(x_ptr, w13_ptr, h_ptr, rows, pair, e, ticket % T1, top_k, top_k,
                          H, I, H, stride_w13, I, 16, BN1, BK1, EVEN_H)
        tl.debug_barrier()  # every thread's stores issued before the release below
        tl.atomic_add(sync_ptr + 2 + p, 1, sem="release", scope="gpu")
    else:  # down
        tile = ticket - num_up
        p = tile // T2
        e = tl.load(ids_ptr + p)
        if (e < 0) | (e >= E):
            e = E  # zeros, without waiting or reading weights
        else:
            ready = tl.atomic_add(sync_ptr + 2 + p, 0, sem="acquire", scope="gpu")
            while ready < T1:
                ready = tl.atomic_add(sync_ptr + 2 + p, 0, sem="acquire", scope="gpu")
        rows, pair = _block_rows(ids_ptr, p, top_k, 16, True)
        _down_tile(h_ptr, w2_ptr, out_ptr, topk_w_ptr, rows, pair, e, tile % T2, top_k, E, H,
                   I, stride_w2, I, H, 16, BN2, BK2, EVEN_I, True)
    done = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if done == num_up + top_k * T2 - 1:  # the last program: every wait has ended
        slots = tl.arange(0, 16)
        for s0 in range(0, top_k + 2, 16):
            tl.atomic_xchg(sync_ptr + s0 + slots, 0, mask=s0 + slots < top_k + 2,
                           sem="relaxed", scope="gpu")


# (BN1, BK1, BN2, BK2, num_warps, num_stages): the two-launch path's one-token tiles to start
# with (fused_moe.moe_config, direct), swept by scripts/bench_moe_decode.py
DEFAULT_CONFIG = (32, 256, 32, 256, 4, 3)


def moe_one(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, config: tuple[int, int, int, int, int, int] | None = None
            ) -> torch.Tensor:
    """x (1, H); w13 (E, 2I, H), w2 (E, H, I) contiguous; topk_weights (1, K) float;
    topk_ids (1, K) int32 in [-1, E), distinct where >= 0 -> (K, H) in x.dtype: the K
    weighted expert outputs, unsummed (fused_moe sums them or hands them on)."""
    num_experts, inter, hidden = w13.shape[0], w13.shape[1] // 2, w13.shape[2]
    top_k = topk_ids.shape[-1]
    assert x.shape == (1, hidden) and w2.shape == (num_experts, hidden, inter)
    bn1, bk1, bn2, bk2, warps, stages = config or envs.moe_one_config() or DEFAULT_CONFIG
    cap = lambda b, d: max(16, min(b, triton.next_power_of_2(d)))  # noqa: E731 (tl.dot >= 16)
    bn1, bk1, bn2, bk2 = cap(bn1, inter), cap(bk1, hidden), cap(bn2, hidden), cap(bk2, inter)
    t1, t2 = triton.cdiv(inter, bn1), triton.cdiv(hidden, bn2)
    h = torch.empty(top_k, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(top_k, hidden, dtype=x.dtype, device=x.device)
    _moe_one_kernel[(top_k * (t1 + t2),)](
        x.contiguous(), w13, w2, h, out, topk_ids.contiguous(),
        topk_weights.contiguous(), _sync(x.device, top_k), num_experts, hidden, inter, top_k,
        t1, t2, w13.stride(0), w2.stride(0), BN1=bn1, BK1=bk1, BN2=bn2, BK2=bk2,
        EVEN_H=hidden % bk1 == 0, EVEN_I=inter % bk2 == 0,
        num_warps=warps, num_stages=stages, **launch_options(x))
    return out


def one_launch_pays(top_k: int, inter: int, device: torch.device) -> bool:
    """One launch where gate/up's tiles fill the SMs at least 4 times (measured: 6.8 won,
    1.5 lost; the threshold between them is not measured finer)."""
    bn1 = (envs.moe_one_config() or DEFAULT_CONFIG)[0]
    return top_k * triton.cdiv(inter, bn1) >= 4 * _num_sms(device)


MAX_TOP_K = 64  # ready counters in the sync buffer (fused_moe keeps two launches above it)


@functools.lru_cache(maxsize=None)
def _sync_buffer(device: torch.device) -> torch.Tensor:
    return torch.zeros(2 + MAX_TOP_K, dtype=torch.int32, device=device)


def _sync(device: torch.device, top_k: int) -> torch.Tensor:
    """The zeroed counters [ticket, finished, ready per pair], shared by every layer's call
    (calls on one stream never overlap: each launch's wait covers the one before)."""
    if top_k > MAX_TOP_K:
        raise ValueError(f"moe_one: top_k {top_k} > {MAX_TOP_K}")
    return _sync_buffer(device)
