"""Batch-1 MoE (one token, K experts) on CUDA: fused_moe's one-token path over a sweep of tiles
(coordinate descent: gate/up tiles with the default down, then down tiles), microseconds
per call in a CUDA graph of 16 calls cycling through 8 random routings, every variant
checked against the PyTorch reference first. Prints a table and one JSON line.

(A matrix-vector form, one program per BLOCK_N features of a pair with no tensor cores, was
swept against it at 9713227 and did not win: 26.1 against 25.9 us on Qwen3-30B-A3B, 174.5
against 177.7 on Mixtral-8x7B; bench/results/2026-12-01-h200-moe-decode-9713227.)

    python scripts/bench_moe_decode.py [--quick]   (--quick: the defaults only)"""

from __future__ import annotations

import json
import sys

import torch

from tandem.bench.timing import graph_us
from tandem.kernels.reference.moe import fused_moe as reference
from tandem.kernels.triton import fused_moe as fm

QUICK = "--quick" in sys.argv
WORKLOADS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
DOT_GATE_UP = [(32, 128, 4, 4), (16, 128, 4, 4), (16, 256, 4, 3), (32, 256, 4, 3),
               (16, 128, 2, 4), (64, 128, 4, 3), (32, 64, 4, 6), (16, 512, 4, 2)]
DOT_DOWN = [(64, 128, 4, 4), (32, 128, 4, 4), (16, 256, 4, 3), (32, 256, 4, 3),
            (128, 64, 4, 4), (16, 128, 2, 4)]


def point(fn, x, w13, w2, routings, ref) -> float | None:
    try:
        out = fn(x, w13, w2, *routings[0])
        if (out.float() - ref).abs().max().item() > 2e-2 * ref.abs().max().item():
            return None
        return graph_us([lambda r=r: fn(x, w13, w2, *r) for r in routings])
    except Exception as err:  # out of resources
        print(f"    {type(err).__name__}: {str(err)[:90]}")
        return None


def descend(label, make_fn, gu_tiles, dn_tiles, default, args) -> tuple[float, tuple]:
    """Coordinate descent over (gate_up, down) tiles; prints every point."""
    best_us, best = point(make_fn(default), *args), default
    print(f"  {label} default {default}: {best_us} us")
    if QUICK or best_us is None:
        return best_us, best
    for gu in gu_tiles:
        us = point(make_fn((gu, best[1])), *args)
        print(f"  {label} gate_up {gu}: {us}")
        if us is not None and us < best_us:
            best_us, best = us, (gu, best[1])
    for dn in dn_tiles:
        us = point(make_fn((best[0], dn)), *args)
        print(f"  {label} down {dn}: {us}")
        if us is not None and us < best_us:
            best_us, best = us, (best[0], dn)
    return best_us, best


rows = []
for name, (E, K, H, I) in WORKLOADS.items():
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device="cuda", generator=g) / H**0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device="cuda", generator=g) / I**0.5).to(torch.bfloat16)
    x = torch.randn(1, H, device="cuda", generator=g).to(torch.bfloat16)
    routings = []
    for _ in range(8):
        w, ids = torch.softmax(torch.randn(1, E, device="cuda", generator=g), -1).topk(K, -1)
        routings.append((w / w.sum(-1, keepdim=True), ids.to(torch.int32)))
    ref = reference(x.float(), w13.float(), w2.float(), *routings[0])
    bytes_ = K * 3 * H * I * 2
    print(f"\n{name}: T=1, {K} of {E} experts, {bytes_ / 1e6:.1f} MB of weights a call")
    cfg = fm.moe_config(K, E, H, I, direct=True)
    us, best = descend(
        "dot", lambda t: (lambda *a: fm.fused_moe(*a, config=fm.MoEConfig(16, *t))),
        DOT_GATE_UP, DOT_DOWN, (cfg.gate_up, cfg.down), (x, w13, w2, routings, ref))
    if us is not None:
        rows.append({"workload": name, "best_tiles": best, "us": us, "GBps": bytes_ / us / 1e3})
        print(f"  BEST: {us:.2f} us {bytes_ / us / 1e3:.0f} GB/s tiles {best}")
print(json.dumps({"bench": "moe_decode", "device": torch.cuda.get_device_name(),
                  "tiles": "(BLOCK_N, BLOCK_K, num_warps, num_stages) for gate_up, down",
                  "rows": rows}))
