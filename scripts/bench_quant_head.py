"""The int4 / int8 weight-only GEMV at batch 1 over a wider tile grid than
`bench_quant_gemv.py`'s, by default on the LM head (Llama-3.1-8B: 128256 x 4096, which that
script sweeps for FP8 only): microseconds per call at each (BLOCK_N, BLOCK_KW, num_warps),
in a CUDA graph of calls cycling through weight copies past L2, after a parity check
against the reference. Prints one line per point and the best per method.
Usage (an H200): python scripts/bench_quant_head.py [N K [BITS,...]]"""

from __future__ import annotations

import itertools
import sys

import torch

from tandem.bench.timing import graph_us
from tandem.kernels.reference import quant
from tandem.kernels.triton import quant_gemm

N, K = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (128256, 4096)
BITS = [int(b) for b in sys.argv[3].split(",")] if len(sys.argv) > 3 else [4, 8]
x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
for bits in BITS:
    copies = []
    for i in range(max(2, -(-256 * 2**20 // (N * K * bits // 8)))):  # >= 256 MB: past L2
        w = torch.randn(N, K, device="cuda") * 0.02
        q = quant.quantize_int4(w, 128, search=False) if bits == 4 else (
            *quant.quantize_int8(w), None)
        copies.append(q)
        del w
    q, s, z = copies[0]
    ref = x.float() @ (quant.dequantize_int4(q, s, z, 128) if bits == 4
                       else quant.dequantize_int8(q, s)).t()
    default = quant_gemm.gemv_config(bits, N, K)
    rows = []
    grid = itertools.product((4, 8, 16), (64, 128, 256, 512, 1024), (1, 2, 4, 8))
    for cfg in [default] + [c for c in grid if c[0] * c[1] <= 8192 and c[1] * 32 // bits <= K]:
        try:
            run = lambda c=copies[0]: quant_gemm.int_gemv(x, c[0], c[1], c[2], bits, 128,  # noqa: E731
                                                          config=cfg)
            err = (run().float() - ref).abs().max().item()
            if err > 2e-2 * ref.abs().max().item():
                print(f"int{bits} {cfg}: wrong ({err:.3g})")
                continue
            us = graph_us([lambda c=c: quant_gemm.int_gemv(x, c[0], c[1], c[2], bits, 128,
                                                           config=cfg) for c in copies])
        except Exception as e:  # out of resources
            print(f"int{bits} {cfg}: {type(e).__name__}")
            continue
        nbytes = q.numel() + s.numel() * 4
        rows.append((us, cfg))
        print(f"int{bits} {cfg}{' (default)' if cfg == default else ''}: {us:.2f} us, "
              f"{nbytes / us / 1e3:.0f} GB/s", flush=True)
    best = min(rows)
    print(f"BEST int{bits} N={N} K={K}: {best[0]:.2f} us {best[1]} (default {default}: "
          f"{rows[0][0]:.2f} us)", flush=True)
    del copies
