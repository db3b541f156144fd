"""cuBLAS (F.linear) against the Triton GEMV at batch 1 on Llama-3.1-8B's weight shapes (or
Qwen3-30B-A3B's dense ones: --qwen3), per config: the numbers behind `layers/linear.py`'s
choice and gemv.default_config. Usage: python scripts/bench_gemv.py [--qwen3]"""

from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F

from tandem.kernels.triton.gemv import gemv

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}
QWEN3 = "--qwen3" in sys.argv
if QWEN3:  # Qwen3-30B-A3B: 32 heads of 128 and 4 KV heads on a hidden size of 2048
    SHAPES = {"qkv": (5120, 2048), "o": (2048, 4096), "router": (128, 2048),
              "lm_head": (151936, 2048)}
GRID = (([2, 4, 8, 16], [512, 1024, 2048], [4, 8], [2, 4]) if QWEN3
        else ([4, 8, 16, 32], [256, 512, 1024], [4, 8], [2, 3, 4]))


def timed(fn, iters=200):
    for _ in range(10):
        fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    s.record()
    g.replay()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters * 1e3  # us


for name, (n, k) in SHAPES.items():
    # several copies, so consecutive calls do not hit L2
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x, ws[0])
    assert torch.allclose(gemv(x, ws[0]).float(), ref.float(), atol=0.5, rtol=2e-2)
    it = iter(range(10**9))
    cublas = timed(lambda: F.linear(x, ws[next(it) % 4]))
    gbytes = n * k * 2 / 1e3
    best = None
    for bn, bk, warps, stages in itertools.product(*GRID):
        if bn * bk > 32768 or bk > k:
            continue
        cfg = (bn, bk, warps, stages)
        try:
            t = timed(lambda: gemv(x, ws[next(it) % 4], config=cfg))
        except Exception:  # out of resources
            continue
        if best is None or t < best[0]:
            best = (t, cfg)
    t0 = timed(lambda: gemv(x, ws[next(it) % 4]))
    print(f"{name:8s} N={n:6d} K={k:5d}: cuBLAS {cublas:7.2f} us ({gbytes / cublas:5.0f} GB/s) "
          f"triton default {t0:7.2f} us, best {best[0]:7.2f} us ({gbytes / best[0]:5.0f} GB/s) "
          f"{best[1]}", flush=True)
