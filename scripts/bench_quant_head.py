"""The int4 / int8 weight-only GEMV on the LM head at batch 1 (Llama-3.1-8B: 128256 x 4096),
the one linear `bench_quant_gemv.py` sweeps for FP8 only: microseconds per call at each
(BLOCK_N, BLOCK_KW, num_warps) of a grid, in a CUDA graph of calls cycling through weight
copies past L2, after a parity check against the reference. Prints one line per point and
the best per method. Usage (an H200): python scripts/bench_quant_head.py [N K]"""

from __future__ import annotations

import itertools
import sys

import torch

from tandem.bench.timing import graph_us
from tandem.kernels.reference import quant
from tandem.kernels.triton import quant_gemm

N, K = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (128256, 4096)
x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
for bits in (4, 8):
    copies = []
    for i in range(2):  # 2 x 263 MB (int4) or 525 MB (int8): past the 50 MB L2
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
    for cfg in [default] + list(itertools.product((4, 8, 16), (64, 128, 256, 512), (1, 2, 4))):
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
