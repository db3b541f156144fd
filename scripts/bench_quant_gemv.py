"""Batch-1 decode GEMVs on Llama-3.1-8B's linear shapes: the int4 / int8 weight-only kernels
(tandem/kernels/triton/quant_gemm.py, `int_gemv`) and the fp8 one (`fp8_gemv`), each at its
default config and at the best of a small sweep, against the bf16 GEMV (kernels/triton/gemv.py).

Each timing is a CUDA graph of 200 calls cycling through enough weight copies (>= 256 MB) that
no call finds its weights in L2, as in a real decode step. GB/s counts the bytes a call must
read: codes plus scales (and zero points). Also: GEMV against GEMM at a few rows (where
GEMV_MAX_ROWS should sit), and a per-layer sum (qkv + o + gate_up + down) per method.

Prints a table, then one JSON line. About 1-2 minutes on an H200, mostly compiling (one
compile per constexpr set, shared by the shapes). Usage: python scripts/bench_quant_gemv.py
[--dry] (--dry: tiny shapes on CPU under TRITON_INTERPRET=1, to check the plumbing).
"""

from __future__ import annotations

import json
import os
import sys

DRY = "--dry" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from tandem.kernels.reference import quant  # noqa: E402
from tandem.kernels.triton import quant_gemm  # noqa: E402
from tandem.kernels.triton.gemv import gemv  # noqa: E402

DEVICE = "cpu" if DRY else "cuda"
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
if DRY:
    SHAPES = {"a": (48, 1024), "b": (24, 3584)}
HBM_TBPS = 4.8  # H200 HBM3e peak
KINDS = ("int4", "int4_asym", "int8", "fp8")

# int GEMV (BLOCK_N, BLOCK_KW, num_warps): 8 rows x one 16-byte quad a thread, fewer / more
# rows, two quads a thread
INT_CONFIGS = [(8, 512, 4), (8, 512, 2), (8, 256, 2), (8, 256, 1), (8, 128, 1), (4, 512, 4),
               (4, 256, 2), (4, 256, 1), (4, 128, 1), (16, 256, 2), (16, 256, 4)]
FP8_CONFIGS = [(16, 512, 4), (8, 512, 4), (32, 512, 4), (16, 1024, 8), (8, 1024, 4), (16, 256, 4)]


def timed(fns) -> float:
    """Microseconds per call of a graph of 200 calls, cycling through `fns` (one per copy)."""
    for f in fns:
        f()
    if DRY:
        return 1.0
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(200):
            fns[i % len(fns)]()
    graph.replay()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / 200)
    return sorted(times)[2]


def copies_for(nbytes: int) -> int:
    return 1 if DRY else min(16, max(2, -(-(256 << 20) // nbytes)))


def make_weights(kind: str, w: torch.Tensor, copies: int) -> tuple[list[dict], int, torch.Tensor]:
    """`copies` quantized copies of w (small noise apart), the bytes a call reads, and the
    dequantized float32 weight of copy 0 (the reference)."""
    out = []
    for c in range(copies):
        wc = w + 1e-3 * c
        if kind == "int8":
            q, s = quant.quantize_int8(wc)
            out.append(dict(q=q, s=s, z=None))
        elif kind == "fp8":
            q, s = quant.quantize_fp8(wc)
            out.append(dict(q=q, s=s, z=None))
        else:
            q, s, z = quant.quantize_int4(wc, 128, kind == "int4")
            out.append(dict(q=q, s=s, z=z))
    d = out[0]
    nbytes = sum(t.numel() * t.element_size() for t in (d["q"], d["s"], d["z"]) if t is not None)
    if kind == "int8":
        ref_w = quant.dequantize_int8(d["q"], d["s"])
    elif kind == "fp8":
        ref_w = d["q"].float() * d["s"][:, None]
    else:
        ref_w = quant.dequantize_int4(d["q"], d["s"], d["z"], 128)
    return out, nbytes, ref_w


def call(kind: str, x: torch.Tensor, d: dict, cfg):
    if kind == "fp8":  # FP8 W8A8 decode: x quantized per token (outside the timing)
        xq, xs = quant_gemm.quantize_fp8_per_token(x)
        return lambda: quant_gemm.fp8_gemv(xq, xs, d["q"], d["s"], None, x.dtype,
                                           *([cfg] if cfg else []))
    bits = 8 if kind == "int8" else 4
    return lambda: quant_gemm.int_gemv(x, d["q"], d["s"], d["z"], bits, 128, None, cfg)


def close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    return (out.float() - ref).abs().max().item() <= tol * ref.abs().max().item()


def sweep_shape(n: int, k: int) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(n + k)
    w = torch.randn(n, k, device=DEVICE, generator=g) * 0.02
    x = torch.randn(1, k, device=DEVICE, generator=g).to(torch.bfloat16)
    c = copies_for(n * k * 2)
    wb = [(w + 1e-3 * i).to(torch.bfloat16) for i in range(c)]
    bf16_us = timed([lambda wi=wi: gemv(x, wi) for wi in wb])
    del wb
    row = {"N": n, "K": k, "bf16": {"us": bf16_us, "GBps": n * k * 2 / bf16_us / 1e3}}
    for kind in ("int4", "int4_asym", "int8", "fp8"):
        ws, nbytes, ref_w = make_weights(kind, w, copies_for(n * k))
        ref = (quant.fp8_linear(x.float(), ws[0]["q"], ws[0]["s"]) if kind == "fp8"
               else x.float() @ ref_w.t())
        # fp8: x is quantized too, the kernel's e4m3 rounding within a step of the reference's
        # (the interpreter casts by truncation: looser with --dry)
        tol = (0.1 if DRY else 3e-2) if kind == "fp8" else 2e-2
        configs = [None] + ([] if kind == "int4_asym" else INT_CONFIGS if kind != "fp8" else
                            [c for c in FP8_CONFIGS if k % c[1] == 0])
        results = []
        for cfg in configs:
            try:
                if not close(call(kind, x, ws[0], cfg)(), ref, tol):
                    print(f"  {kind} {cfg}: WRONG RESULT", flush=True)
                    continue
                results.append((timed([call(kind, x, d, cfg) for d in ws]), cfg))
            except Exception as e:  # out of resources / registers
                print(f"  {kind} {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
        if not results:
            continue
        default_us = results[0][0] if results[0][1] is None else float("nan")
        best_us, best_cfg = min(results, key=lambda r: r[0])
        default_cfg = (quant_gemm.gemv_config(8 if kind == "int8" else 4, n, k)
                       if kind != "fp8" else quant_gemm.fp8_gemv_config(n, k))
        row[kind] = {"sweep": {str(cfg): round(us, 2) for us, cfg in results},
                     "bytes": nbytes, "default_us": default_us, "default_cfg": default_cfg,
                     "best_us": best_us, "best_cfg": best_cfg or default_cfg,
                     "GBps": nbytes / best_us / 1e3, "default_GBps": nbytes / default_us / 1e3,
                     "speedup_vs_bf16": bf16_us / best_us,
                     "default_speedup_vs_bf16": bf16_us / default_us}
        del ws
    return row


def rows_crossover(n: int = 6144, k: int = 4096) -> dict:
    """int4 / int8 at M rows: the GEMV (one program per row and weight block) against the GEMM."""
    if DRY:
        n, k = 64, 512
    g = torch.Generator(device=DEVICE).manual_seed(7)
    w = torch.randn(n, k, device=DEVICE, generator=g) * 0.02
    out = {}
    for kind in ("int4", "int8"):
        ws, _, _ = make_weights(kind, w, copies_for(n * k))
        bits = 8 if kind == "int8" else 4
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device=DEVICE, generator=g).to(torch.bfloat16)
            rec = {}
            if m <= 8:
                rec["gemv_us"] = timed([lambda d=d: quant_gemm.int_gemv(
                    x, d["q"], d["s"], d["z"], bits, 128) for d in ws])
            saved, quant_gemm.GEMV_MAX_ROWS = quant_gemm.GEMV_MAX_ROWS, 0  # GEMM at any M
            try:
                rec["gemm_us"] = timed([lambda d=d: quant_gemm.quant_linear(
                    x, d["q"], d["s"], d["z"], bits, 128) for d in ws])
            finally:
                quant_gemm.GEMV_MAX_ROWS = saved
            out[f"{kind}_M{m}"] = rec
        del ws
    return out


def main() -> None:
    torch.manual_seed(0)
    device = "cpu (interpreter)" if DRY else torch.cuda.get_device_name()
    rows = {}
    print("us per call (default config / best of the sweep), best GB/s, best speedup vs bf16")
    print(f"{'shape':8s} {'N':>6s} {'K':>6s} | {'bf16 us':>8s} {'GB/s':>5s} | "
          + " | ".join(f"{k:>9s} def/best us  GB/s   x" for k in KINDS))
    for name, (n, k) in SHAPES.items():
        r = rows[name] = sweep_shape(n, k)
        cells = [f"{r[q]['default_us']:9.1f}/{r[q]['best_us']:6.1f} {r[q]['GBps']:5.0f} "
                 f"{r[q]['speedup_vs_bf16']:4.2f}" if q in r else f"{'failed':>26s}"
                 for q in KINDS]
        print(f"{name:8s} {n:6d} {k:6d} | {r['bf16']['us']:8.1f} {r['bf16']['GBps']:5.0f} | "
              + " | ".join(cells), flush=True)
        for q in ("int4", "int8", "fp8"):
            if q in r:
                print(f"    {q:5s} best cfg {r[q]['best_cfg']} (default {r[q]['default_cfg']})")
    layer = {"bf16": sum(r["bf16"]["us"] for r in rows.values())}
    for q in KINDS:
        if all(q in r for r in rows.values()):
            layer[q + "_default"] = sum(r[q]["default_us"] for r in rows.values())
            layer[q + "_best"] = sum(r[q]["best_us"] for r in rows.values())
    print("per layer (qkv + o + gate_up + down), us: "
          + ", ".join(f"{k} {v:.1f} ({layer['bf16'] / v:.2f}x)" for k, v in layer.items()))
    cross = rows_crossover()
    print("rows: " + ", ".join(f"{k} " + "/".join(f"{v:.1f}" for v in rec.values())
                               for k, rec in cross.items()) + "   (gemv/gemm us)")
    print(json.dumps({"bench": "quant_gemv", "device": device, "hbm_peak_TBps": HBM_TBPS,
                      "workload": "Llama-3.1-8B linears, batch 1, bf16 activations, "
                                  "weights cycled past L2",
                      "shapes": rows, "layer_us": layer, "rows_crossover": cross}))


if __name__ == "__main__":
    main()
