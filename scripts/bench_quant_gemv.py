"""Sweep the quantized GEMV kernels' tile configs on Llama-3.1-8B decode shapes (batch 1):
GB/s of weight bytes read, against the bf16 GEMV. Prints the best config per (method, shape)."""

from __future__ import annotations

import itertools
import json

import torch
import triton

from tandem.kernels.reference import quant
from tandem.kernels.triton import quant_gemm
from tandem.kernels.triton.gemv import gemv

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def timed(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=50) * 1e3  # us


def run_cfg(kind, x, w, cfg):
    block_n, block_k, warps, stages = cfg
    n, k = w["n"], w["k"]
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    if kind == "int8":
        args = (x, w["q"], w["s"], w["s"], w["s"], y, w["s"])
        meta = dict(BITS=8, G=k, HAS_ZERO=False, HAS_XSCALE=False)
    elif kind == "fp8":
        args = (w["xq"], w["q"], w["s"], w["s"], w["s"], y, w["xs"])
        meta = dict(BITS=8, G=k, HAS_ZERO=False, HAS_XSCALE=True)
    else:
        args = (x, w["q"], w["s"], w["s"], w["s"], y, w["s"])
        meta = dict(BITS=4, G=128, HAS_ZERO=False, HAS_XSCALE=False)
    grid = (triton.cdiv(n, block_n), 1)
    return lambda: quant_gemm._gemv_kernel[grid](*args, n, k, k, n, HAS_BIAS=False,
                                                 BLOCK_N=block_n, BLOCK_K=block_k,
                                                 num_warps=warps, num_stages=stages, **meta)


def main() -> None:
    torch.manual_seed(0)
    out = []
    for n, k in SHAPES:
        w_full = torch.randn(n, k, device="cuda")
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        wb = w_full.to(torch.bfloat16)
        base = timed(lambda: gemv(x, wb))
        row = {"shape": [n, k], "bf16_us": base, "bf16_GBps": n * k * 2 / base / 1e3}
        q8, s8 = quant.quantize_int8(w_full)
        f8, fs = quant.quantize_fp8(w_full)
        xq, xs = quant_gemm.quantize_fp8_per_token(x)
        p4, s4, _ = quant.quantize_int4(w_full, 128, True)
        kinds = {"int8": (dict(q=q8, s=s8), n * k), "fp8": (dict(q=f8, s=fs, xq=xq, xs=xs), n * k),
                 "int4": (dict(q=p4, s=s4), n * k // 2)}
        for kind, (w, nbytes) in kinds.items():
            w.update(n=n, k=k)
            best = None
            for cfg in itertools.product([8, 16, 32], [256, 512, 1024], [4, 8], [1, 3]):
                if kind == "int4" and cfg[1] < 128:
                    continue
                try:
                    us = timed(run_cfg(kind, x, w, cfg))
                except Exception:
                    continue
                if best is None or us < best[0]:
                    best = (us, cfg)
            row[kind] = {"us": best[0], "cfg": best[1], "GBps": nbytes / best[0] / 1e3,
                         "speedup_vs_bf16": base / best[0]}
        print(json.dumps(row), flush=True)
        out.append(row)


if __name__ == "__main__":
    main()
