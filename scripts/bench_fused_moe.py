"""The fused mixture-of-experts kernel (tandem/kernels/triton/fused_moe.py) on two expert
shapes, from decode to prefill sizes, against the PyTorch reference (kernels/reference/moe.py):

    qwen3-30b-a3b   E 128, top-8, H 2048, I 768
    mixtral-8x7b    E 8,   top-2, H 4096, I 14336

at T = 1, 4, 16, 64, 256, 1024, 4096 tokens with random softmax top-k routing. The Triton
time is a CUDA graph of several calls (as decode runs it), cycling through 8 routings so
that small T finds few of its experts in L2; median of 10 replays. The reference (host syncs,
so no graph) is timed eagerly. GB/s counts the expert weights a call must read (distinct
experts hit x 3 x H x I x 2 bytes), TFLOP/s the matmuls of the routed pairs (6 H I per pair);
"bound" is the larger of the two at the H200's peaks (4.8 TB/s, 989 dense bf16 TFLOP/s).

--sweep: also time a few tile configs per T (BLOCK_M x gate/up tiles with the default down
tiles, then down tiles with the best gate/up), and print the best per T, for moe_config.
--tokens=1,4,16: only these T; --tiers=16,32: only these BLOCK_M tiers in the sweep.
Prints a table, then one JSON line. Usage: python scripts/bench_fused_moe.py [--sweep]
[--tokens=...] [--tiers=...] [--dry] (--dry: tiny shapes on CPU under TRITON_INTERPRET=1,
to check the plumbing).
"""

from __future__ import annotations

import json
import os
import statistics
import sys

DRY = "--dry" in sys.argv
SWEEP = "--sweep" in sys.argv
_OPTS = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from tandem.kernels.reference.moe import fused_moe as reference  # noqa: E402
from tandem.kernels.triton.fused_moe import MoEConfig, fused_moe, moe_config  # noqa: E402

DEVICE = "cpu" if DRY else "cuda"
WORKLOADS = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
TOKENS = tuple(int(t) for t in _OPTS.get("tokens", "1,4,16,64,256,1024,4096").split(","))
TIERS = tuple(int(t) for t in _OPTS.get("tiers", "16,64,256,1024").split(","))
if DRY:
    WORKLOADS = {"tiny": (8, 2, 64, 32)}
    TOKENS = (1, 4, 16)
HBM_TBPS, BF16_TFLOPS = 4.8, 989.0  # H200 peaks
ROUTINGS = 1 if DRY else 8
GATE_UP_TILES = [(32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 4, 3),
                 (64, 64, 8, 3), (128, 64, 8, 3), (32, 64, 4, 5), (16, 256, 4, 4),
                 (32, 256, 4, 3), (16, 128, 2, 4), (32, 128, 2, 4)]
DOWN_TILES = [(64, 128, 4, 4), (32, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 4),
              (128, 64, 8, 3), (256, 64, 8, 3), (128, 128, 8, 3), (32, 256, 4, 3),
              (64, 256, 4, 3), (16, 128, 2, 4), (32, 128, 2, 4)]


def timed(fns: list, calls: int, graph: bool) -> float:
    """Microseconds per call: `calls` calls cycling through fns, in a CUDA graph or eagerly;
    the median of 10 repetitions (3 eagerly)."""
    for f in fns:
        f()  # compile, warm
    if DRY:
        return 1.0
    torch.cuda.synchronize()
    run = lambda: [fns[i % len(fns)]() for i in range(calls)]  # noqa: E731
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        run = g.replay
        run()
    times = []
    for _ in range(10 if graph else 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def make(num_tokens: int, num_experts: int, top_k: int, hidden: int, inter: int):
    g = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, device=DEVICE, generator=g).to(torch.bfloat16)
    routings = []
    for _ in range(ROUTINGS):
        logits = torch.randn(num_tokens, num_experts, device=DEVICE, generator=g)
        w, ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
        routings.append((w / w.sum(-1, keepdim=True), ids.to(torch.int32)))
    return x, routings


def close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    return (out.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


def bench_point(x, routings, w13, w2, cfg: MoEConfig | None, ref: torch.Tensor) -> float | None:
    """Microseconds per call at cfg (None: moe_config's), or None if wrong or failing."""
    try:
        if not close(fused_moe(x, w13, w2, *routings[0], config=cfg), ref):
            print(f"    {cfg}: WRONG RESULT", flush=True)
            return None
        calls = 16 if x.shape[0] <= 256 else 4
        return timed([lambda r=r: fused_moe(x, w13, w2, *r, config=cfg) for r in routings],
                     calls, graph=True)
    except Exception as e:  # out of resources
        print(f"    {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
        return None


def sweep(x, routings, w13, w2, ref) -> tuple[MoEConfig, float]:
    """Coordinate descent: BLOCK_M x gate/up tiles (down at its default), then down tiles."""
    results = []
    hidden, inter = x.shape[1], w2.shape[2]
    for rows_per_expert in TIERS:  # moe_config's BLOCK_M tiers (16, 64, 256, 1024)
        tier = moe_config(rows_per_expert, 1, hidden, inter)
        for gu in GATE_UP_TILES:
            cfg = MoEConfig(tier.block_m, gu, tier.down)
            us = bench_point(x, routings, w13, w2, cfg, ref)
            if us is not None:
                results.append((us, cfg))
    best_us, best = min(results, key=lambda r: r[0])
    for dn in DOWN_TILES:
        cfg = MoEConfig(best.block_m, best.gate_up, dn)
        us = bench_point(x, routings, w13, w2, cfg, ref)
        if us is not None and us < best_us:
            best_us, best = us, cfg
    return best, best_us


def run_workload(name: str, num_experts: int, top_k: int, hidden: int, inter: int) -> list:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, generator=g)
           / hidden**0.5).to(torch.bfloat16)
    w2 = (torch.randn(num_experts, hidden, inter, device=DEVICE, generator=g)
          / inter**0.5).to(torch.bfloat16)
    rows = []
    for t in TOKENS:
        x, routings = make(t, num_experts, top_k, hidden, inter)
        ref = reference(x, w13, w2, *routings[0]).float()
        cfg = moe_config(t * top_k, num_experts, hidden, inter)
        us = bench_point(x, routings, w13, w2, None, ref)
        ref_us = timed([lambda r=r: reference(x, w13, w2, *r) for r in routings[:2]], 2,
                       graph=False)
        experts_hit = statistics.mean(len(set(ids.flatten().tolist())) for _, ids in routings)
        nbytes = experts_hit * 3 * hidden * inter * 2
        flops = 6 * t * top_k * hidden * inter
        bound_us = max(nbytes / HBM_TBPS / 1e6, flops / BF16_TFLOPS / 1e6)
        row = {"workload": name, "T": t, "config": str(cfg), "us": us, "reference_us": ref_us,
               "experts_hit": experts_hit, "weight_bytes": nbytes, "flops": flops,
               "GBps": nbytes / us / 1e3 if us else None,
               "TFLOPs": flops / us / 1e6 if us else None, "bound_us": bound_us,
               "of_bound": bound_us / us if us else None}
        if SWEEP:
            best, best_us = sweep(x, routings, w13, w2, ref)
            row.update(best_config=str(best), best_us=best_us)
        rows.append(row)
        print(f"{name:14s} {t:5d} {experts_hit:7.1f} {us or float('nan'):9.1f} "
              f"{ref_us:10.1f} {row['GBps'] or 0:7.0f} {row['TFLOPs'] or 0:7.1f} "
              f"{bound_us:8.1f} {row['of_bound'] or 0:6.2f}", flush=True)
    return rows


def main() -> None:
    torch.manual_seed(0)
    device = "cpu (interpreter)" if DRY else torch.cuda.get_device_name()
    print(f"{'workload':14s} {'T':>5s} {'experts':>7s} {'triton us':>9s} {'ref us':>10s} "
          f"{'GB/s':>7s} {'TFLOP/s':>7s} {'bound us':>8s} {'of bnd':>6s}")
    rows = [r for name, shape in WORKLOADS.items() for r in run_workload(name, *shape)]
    if SWEEP:
        print("best config per T (sweep):")
        for r in rows:
            print(f"  {r['workload']:14s} T {r['T']:5d}  {r['best_us']:9.1f} us  "
                  f"{r['best_config']}   (default {r['us'] or float('nan'):.1f} us)")
    print(json.dumps({"bench": "fused_moe", "device": device,
                      "hbm_peak_TBps": HBM_TBPS, "bf16_peak_TFLOPs": BF16_TFLOPS,
                      "workload": {name: dict(zip(("E", "K", "H", "I"), s))
                                   for name, s in WORKLOADS.items()},
                      "notes": "bf16, random softmax top-k routing (8 routings cycled), "
                               "Triton in CUDA graphs, reference eager",
                      "argv": sys.argv[1:], "rows": rows}))


if __name__ == "__main__":
    main()
