"""The 8k prefill's linears as cuBLAS runs them, in the model's order (qkv, o, gate_up, down)
for every layer with each layer's own weights, one variant against another, interleaved:

    linear     F.linear(x, W), W (N, K): what the engine runs
    kn         x @ W' with W' (K, N) contiguous: the other weight layout
    addmm      o and down as addmm(residual, x, W^T): the residual add in the GEMM epilogue
    lt-linear  F.linear with cuBLASLt preferred over cuBLAS

Prints ms per forward's linears and TFLOP/s per variant, then one JSON line.

    python scripts/bench_prefill_gemms.py [--tokens 8192] [--layers 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--tokens", type=int, default=8192)
ap.add_argument("--layers", type=int, default=32)
ap.add_argument("--hidden", type=int, default=4096)
ap.add_argument("--qkv", type=int, default=6144)
ap.add_argument("--inter", type=int, default=14336)
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--variants", default="linear,kn,addmm,lt-linear")
args = ap.parse_args()

dev, dt = torch.device("cuda"), torch.bfloat16
T, H, I = args.tokens, args.hidden, args.inter
shapes = {"qkv": (args.qkv, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
w = [{k: torch.randn(n, kk, device=dev, dtype=dt) * 0.02 for k, (n, kk) in shapes.items()}
     for _ in range(args.layers)]
wt = [{k: v.t().contiguous() for k, v in layer.items()} for layer in w]
x = {k: torch.randn(T, kk, device=dev, dtype=dt) for k, (_, kk) in shapes.items()}
res = torch.randn(T, H, device=dev, dtype=dt)
flops = 2 * T * sum(n * kk for n, kk in shapes.values()) * args.layers


def run(variant: str) -> None:
    for lw, lt in zip(w, wt):
        for k in shapes:
            if variant == "kn":
                torch.mm(x[k], lt[k])
            elif variant == "addmm" and k in ("o", "down"):
                torch.addmm(res, x[k], lw[k].t())
            else:
                F.linear(x[k], lw[k])


def timed(variant: str) -> float:
    lib = torch.backends.cuda.preferred_blas_library()
    if variant.startswith("lt-"):
        torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        base = variant.removeprefix("lt-")
        run(base)  # heuristics, workspace: untimed
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        run(base)
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    finally:
        torch.backends.cuda.preferred_blas_library(lib)


variants = args.variants.split(",")
times: dict[str, list[float]] = {v: [] for v in variants}
for _ in range(args.rounds):
    for v in variants:
        times[v].append(timed(v))
print(f"{T} tokens x {args.layers} layers, linears {flops / 1e12:.1f} TFLOP; "
      f"blas default {torch.backends.cuda.preferred_blas_library()}")
print(f"{'variant':10s} {'median ms':>10s} {'best ms':>9s} {'TFLOP/s (median)':>17s}")
record = {"benchmark": "prefill_gemms", "device": torch.cuda.get_device_name(),
          "tokens": T, "layers": args.layers, "flops": flops, "variants": {}}
for v, ts in times.items():
    med = statistics.median(ts)
    print(f"{v:10s} {med:10.2f} {min(ts):9.2f} {flops / med / 1e9:17.1f}")
    record["variants"][v] = {"ms": ts, "median_ms": med, "tflops": flops / med / 1e9}
print(json.dumps(record))
