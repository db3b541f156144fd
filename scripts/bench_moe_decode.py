"""Batch-1 MoE (one token, K experts) on CUDA: fused_moe's two-launch one-token path (gate/up,
then down) at its tiles against the one-launch kernel (kernels/triton/moe_one.py) over a
sweep of its tiles (coordinate descent: gate/up tiles, then down tiles, then warps),
microseconds per call in a CUDA graph of 16 calls cycling through 8 random routings, every
variant checked against the PyTorch reference first. Prints a table and one JSON line.

(The two-launch path's own tiles were swept at 9713227, with a matrix-vector form that did
not beat tl.dot there: 26.1 against 25.9 us on Qwen3-30B-A3B, 174.5 against 177.7 on
Mixtral-8x7B; bench/results/2026-12-01-h200-moe-decode-9713227.)

    python scripts/bench_moe_decode.py [--quick]   (--quick: the defaults only)"""

from __future__ import annotations

import json
import sys

import torch

from tandem.bench.timing import graph_us
from tandem.kernels.reference.moe import fused_moe as reference
from tandem.kernels.triton import fused_moe as fm
from tandem.kernels.triton import moe_one

QUICK = "--quick" in sys.argv
WORKLOADS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
# one launch: (BN1, BK1) gate/up tiles, (BN2, BK2) down tiles, (num_warps, num_stages)
ONE_GATE_UP = [(16, 256), (32, 128), (32, 512), (64, 128), (64, 256), (16, 512)]
ONE_DOWN = [(16, 256), (32, 128), (64, 128), (64, 256), (128, 64), (32, 512), (128, 128)]
ONE_WARPS = [(4, 4), (8, 3), (4, 2), (2, 4), (8, 4)]


def point(fn, x, w13, w2, routings, ref) -> float | None:
    """fn returns the K weighted expert outputs unsummed (no slot-sum launch is timed)."""
    try:
        out = fn(x, w13, w2, *routings[0]).float().reshape(-1, ref.shape[-1]).sum(0)
        if (out - ref[0]).abs().max().item() > 2e-2 * ref.abs().max().item():
            return None
        return graph_us([lambda r=r: fn(x, w13, w2, *r) for r in routings])
    except Exception as err:  # out of resources
        print(f"    {type(err).__name__}: {str(err)[:90]}")
        return None


def descend(label, make_fn, default, args) -> tuple[float, tuple]:
    """Coordinate descent over the one-launch tiles; prints every point."""
    best_us, best = point(make_fn(default), *args), default
    print(f"  {label} default {default}: {best_us} us")
    if QUICK or best_us is None:
        return best_us, best
    for axis, values in ((0, ONE_GATE_UP), (1, ONE_DOWN), (2, ONE_WARPS)):
        for v in values:
            cand = best[:2 * axis] + v + best[2 * axis + len(v):]
            if cand == best:
                continue
            us = point(make_fn(cand), *args)
            print(f"  {label} {cand}: {us}")
            if us is not None and us < best_us:
                best_us, best = us, cand
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
    two = point(lambda *a: fm.fused_moe(*a, config=cfg, reduce=False), x, w13, w2, routings,
                ref)
    print(f"  two launches {(cfg.gate_up, cfg.down)}: {two} us")
    one = lambda c: (lambda *a: moe_one.moe_one(*a, config=c))  # noqa: E731
    us, best = descend("one launch", one, moe_one.DEFAULT_CONFIG, (x, w13, w2, routings, ref))
    if us is not None:
        rows.append({"workload": name, "two_launch_us": two, "one_launch_us": us,
                     "best_config": best, "GBps": bytes_ / us / 1e3,
                     "default_us": point(one(moe_one.DEFAULT_CONFIG), x, w13, w2, routings,
                                         ref)})
        print(f"  BEST one launch: {us:.2f} us {bytes_ / us / 1e3:.0f} GB/s {best}; "
              f"two launches {two} us")
print(json.dumps({"bench": "moe_decode", "device": torch.cuda.get_device_name(),
                  "config": "(BN1, BK1, BN2, BK2, num_warps, num_stages) of "
                            "kernels/triton/moe_one.py",
                  "rows": rows}))
