"""Batch-1 decode GEMVs on Llama-3.1-8B's linear shapes: the int4 / int8 weight-only kernels
(tandem/kernels/triton/quant_gemm.py, `int_gemv`) and the FP8 W8A8 ones, each at its default
config and at the best of a small sweep, against the bf16 GEMV (kernels/triton/gemv.py):

    fp8_cast     quant_gemm.fp8_cast_gemv, x quantized in the kernel (quantize_x): each e4m3
                 weight cast to float32 in registers (the decode path before fp8_gemv.py)
    fp8_dot      fp8_gemv.fp8_dot_gemv, x quantized in the kernel: e4m3 x e4m3 on the tensor
                 cores; swept over block_n, block_k, split_k, num_warps, num_stages, prefetch_k
    fp8_dot_sep  quantize_fp8_per_token, then fp8_dot_gemv on e4m3 x (two kernels), at the
                 default config and at fp8_dot's best: is quantizing x in every program cheaper
                 than one more launch?

Each timing is a CUDA graph of 200 calls cycling through enough weight copies (>= 256 MB) that
no call finds its weights in L2, as in a real decode step (bf16 activations, one row; FP8 times
include quantizing x). GB/s counts the bytes a call must read: codes plus scales (and zero
points). Also: the per-layer sum (qkv + o + gate_up + down) per method, in us and TB/s; the
lm_head (128256 x 4096, FP8 only: quantized when a policy names it); GEMV against GEMM at a few
rows (where GEMV_MAX_ROWS should sit); the FP8 kernels at 1-8 rows.

Prints a table, the best config per shape, then one JSON line (the last line). About 3-5
minutes on an H200, mostly compiling (one compile per constexpr set, shared by the shapes).

Usage, from the repository root on an H200 (the commit in the file names):

    python scripts/bench_quant_gemv.py | tee bench/results/<date>-h200-quant/gemv-sweep-<commit>.log
    tail -n 1 bench/results/<date>-h200-quant/gemv-sweep-<commit>.log > .../gemv-sweep.json

    --fp8-only   bf16 and the FP8 kernels only (skips the int4 / int8 sweeps and rows)
    --cast-only  bf16 and fp8_cast only
    --dry        tiny shapes on CPU under TRITON_INTERPRET=1, to check the plumbing
"""

from __future__ import annotations

import json
import os
import sys

DRY = "--dry" in sys.argv
FP8_ONLY = "--fp8-only" in sys.argv or "--cast-only" in sys.argv
CAST_ONLY = "--cast-only" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from tandem.bench.timing import graph_us  # noqa: E402
from tandem.kernels.reference import quant  # noqa: E402
from tandem.kernels.triton import quant_gemm  # noqa: E402
from tandem.kernels.triton.fp8_gemv import (Fp8DotConfig, fp8_dot_gemv,  # noqa: E402
                                            fp8_dot_gemv_config)
from tandem.kernels.triton.gemv import gemv  # noqa: E402

DEVICE = "cpu" if DRY else "cuda"
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
EXTRA_SHAPES = {"lm_head": (128256, 4096)}  # FP8 only, not in the per-layer sum
if DRY:
    SHAPES = {"a": (48, 1024), "b": (24, 3584)}
    EXTRA_SHAPES = {"c": (200, 300)}
HBM_TBPS = 4.8  # H200 HBM3e peak
FP8_KINDS = ("fp8_cast",) if CAST_ONLY else ("fp8_cast", "fp8_dot", "fp8_dot_sep")
KINDS = FP8_KINDS if FP8_ONLY else ("int4", "int4_asym", "int8") + FP8_KINDS

# int GEMV (BLOCK_N, BLOCK_KW, num_warps): 8 rows x one 16-byte quad a thread, fewer / more
# rows, two quads a thread
INT_CONFIGS = [(8, 512, 4), (8, 512, 2), (8, 256, 2), (8, 256, 1), (8, 128, 1), (4, 512, 4),
               (4, 256, 2), (4, 256, 1), (4, 128, 1), (16, 256, 2), (16, 256, 4)]
# fp8_cast (BLOCK_N, BLOCK_K, num_warps), each with float32 and with fp16 products (the fourth
# field: _float_tile's HALF), plus tiles only fp16 products use
FP8_TILES = [(16, 512, 4), (8, 512, 4), (32, 512, 4), (16, 1024, 8), (8, 1024, 4), (16, 256, 4)]
FP8_CONFIGS = ([(*c, half) for half in (False, True) for c in FP8_TILES]
               + [(32, 1024, 8, True), (16, 2048, 8, True), (32, 512, 8, True)])
# fp8_dot tiles (block_n, block_k, num_warps, num_stages), each at every split_k that keeps
# the programs within ~4 an SM and >= 2 tiles a split; shared memory 70-140 KB
DOT_TILES = [(64, 256, 4, 4), (64, 256, 4, 3), (64, 128, 4, 6), (64, 512, 4, 3),
             (128, 128, 8, 4), (128, 256, 8, 3), (128, 256, 4, 3)]
DOT_SPLITS = (1, 2, 4, 8)
DOT_PREFETCH = (0, 1024)  # besides each tile's default 512, at the default tile and split


def dot_configs(n: int, k: int) -> list[Fp8DotConfig]:
    """The fp8_dot sweep for one shape (the default config is timed apart, first)."""
    out = []
    for bn, bk, warps, stages in DOT_TILES:
        blocks, tiles = -(-n // bn), -(-k // bk)
        for split in DOT_SPLITS:
            if split == 1 or (blocks * split <= 4 * 132 and tiles // split >= 2):
                out.append(Fp8DotConfig(block_n=bn, block_k=bk, split_k=split, num_warps=warps,
                                        num_stages=stages))
    default = fp8_dot_gemv_config(n, k)
    out += [Fp8DotConfig(block_n=default.block_n, block_k=default.block_k,
                         split_k=default.split_k, num_warps=default.num_warps,
                         num_stages=default.num_stages, prefetch_k=pf) for pf in DOT_PREFETCH]
    return [c for c in dict.fromkeys(out) if c != default]


def cfg_name(cfg) -> str:
    """A config as a short string (the JSON keys): a tuple as it prints, an Fp8DotConfig as
    "n64 k256 s2 w4 st4 pf512"."""
    if isinstance(cfg, Fp8DotConfig):
        return (f"n{cfg.block_n} k{cfg.block_k} s{cfg.split_k} w{cfg.num_warps} "
                f"st{cfg.num_stages} pf{cfg.prefetch_k}")
    return str(cfg)


def timed(fns) -> float:
    """Microseconds per call of a graph of 200 calls, cycling through `fns` (one per copy)."""
    if DRY:
        for f in fns:
            f()
        return 1.0
    return graph_us(fns, calls=200, repeats=5)


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
        elif kind.startswith("fp8"):
            q, s = quant.quantize_fp8(wc)
            out.append(dict(q=q, s=s, z=None))
        else:
            q, s, z = quant.quantize_int4(wc, 128, kind == "int4")
            out.append(dict(q=q, s=s, z=z))
    d = out[0]
    nbytes = sum(t.numel() * t.element_size() for t in (d["q"], d["s"], d["z"]) if t is not None)
    if kind == "int8":
        ref_w = quant.dequantize_int8(d["q"], d["s"])
    elif kind.startswith("fp8"):
        ref_w = d["q"].float() * d["s"][:, None]
    else:
        ref_w = quant.dequantize_int4(d["q"], d["s"], d["z"], 128)
    return out, nbytes, ref_w


def call(kind: str, x: torch.Tensor, d: dict, cfg):
    """One call of `kind` at config cfg (None: its default). FP8 W8A8 quantizes x per token in
    the timed call, as the decode step does."""
    if kind == "fp8_cast":
        return lambda: quant_gemm.fp8_cast_gemv(x, None, d["q"], d["s"], None, x.dtype, cfg,
                                                quantize_x=True)
    if kind == "fp8_dot":
        return lambda: fp8_dot_gemv(x, None, d["q"], d["s"], None, x.dtype, cfg)
    if kind == "fp8_dot_sep":
        def sep():
            xq, xs = quant_gemm.quantize_fp8_per_token(x)
            return fp8_dot_gemv(xq, xs, d["q"], d["s"], None, x.dtype, cfg)
        return sep
    bits = 8 if kind == "int8" else 4
    return lambda: quant_gemm.int_gemv(x, d["q"], d["s"], d["z"], bits, 128, None, cfg)


def close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    return (out.float() - ref).abs().max().item() <= tol * ref.abs().max().item()


def default_config(kind: str, n: int, k: int):
    if kind == "fp8_cast":
        return quant_gemm.fp8_gemv_config(n, k)
    if kind.startswith("fp8_dot"):
        return fp8_dot_gemv_config(n, k)
    return quant_gemm.gemv_config(8 if kind == "int8" else 4, n, k)


def configs_for(kind: str, n: int, k: int, best: dict) -> list:
    """The configs to time, None (the default) first. best: the best config of each kind
    swept so far on this shape."""
    if kind == "int4_asym":
        return [None]
    if kind in ("int4", "int8"):
        return [None] + INT_CONFIGS
    if kind == "fp8_cast":  # no K masking: K a multiple of BLOCK_K
        return [None] + [c for c in FP8_CONFIGS if k % c[1] == 0] if k % 512 == 0 else []
    if kind == "fp8_dot":
        return [None] + dot_configs(n, k)
    return [None] + ([best["fp8_dot"]] if best.get("fp8_dot") else [])  # fp8_dot_sep


def sweep_shape(n: int, k: int, kinds: tuple[str, ...]) -> dict:
    g = torch.Generator(device=DEVICE).manual_seed(n + k)
    w = torch.randn(n, k, device=DEVICE, generator=g) * 0.02
    x = torch.randn(1, k, device=DEVICE, generator=g).to(torch.bfloat16)
    c = copies_for(n * k * 2)
    wb = [(w + 1e-3 * i).to(torch.bfloat16) for i in range(c)]
    bf16_us = timed([lambda wi=wi: gemv(x, wi) for wi in wb])
    del wb
    row = {"N": n, "K": k, "bf16": {"us": bf16_us, "GBps": n * k * 2 / bf16_us / 1e3}}
    best = {}
    fp8_weights = None  # the fp8 kinds share one set of copies
    for kind in kinds:
        if kind.startswith("fp8"):
            fp8_weights = fp8_weights or make_weights(kind, w, copies_for(n * k))
            ws, nbytes, ref_w = fp8_weights
            ref = quant.fp8_linear(x.float(), ws[0]["q"], ws[0]["s"])
        else:
            ws, nbytes, ref_w = make_weights(kind, w, copies_for(n * k))
            ref = x.float() @ ref_w.t()
        # fp8: x is quantized too, the kernel's e4m3 rounding within a step of the reference's
        # (the interpreter's fp32 -> e4m3 cast drops carries: looser with --dry)
        tol = (0.1 if DRY else 3e-2) if kind.startswith("fp8") else 2e-2
        results = []
        for cfg in configs_for(kind, n, k, best):
            try:
                if not close(call(kind, x, ws[0], cfg)(), ref, tol):
                    print(f"  {kind} {cfg_name(cfg)}: WRONG RESULT", flush=True)
                    continue
                results.append((timed([call(kind, x, d, cfg) for d in ws]), cfg))
            except Exception as e:  # out of resources / registers
                print(f"  {kind} {cfg_name(cfg)}: {type(e).__name__}: {str(e)[:100]}", flush=True)
        if not kind.startswith("fp8"):
            del ws
        if not results:
            continue
        default_us = results[0][0] if results[0][1] is None else float("nan")
        best_us, best_cfg = min(results, key=lambda r: r[0])
        default_cfg = default_config(kind, n, k)
        best[kind] = best_cfg or default_cfg
        row[kind] = {"sweep": {cfg_name(cfg or default_cfg): round(us, 2) for us, cfg in results},
                     "bytes": nbytes, "default_us": default_us,
                     "default_cfg": cfg_name(default_cfg), "best_us": best_us,
                     "best_cfg": cfg_name(best_cfg or default_cfg),
                     "GBps": nbytes / best_us / 1e3, "default_GBps": nbytes / default_us / 1e3,
                     "speedup_vs_bf16": bf16_us / best_us,
                     "default_speedup_vs_bf16": bf16_us / default_us}
    return row


def fp8_rows(n: int = 6144, k: int = 4096) -> dict:
    """The FP8 kernels at their default configs at 1-8 rows (qkv's shape): how the in-kernel
    quantization (an amax pass over every row in every program) scales with M."""
    if DRY:
        n, k = 64, 512
    g = torch.Generator(device=DEVICE).manual_seed(8)
    ws, _, _ = make_weights("fp8", torch.randn(n, k, device=DEVICE, generator=g) * 0.02,
                            copies_for(n * k))
    out = {}
    for m in (1, 2, 4, 8):
        x = torch.randn(m, k, device=DEVICE, generator=g).to(torch.bfloat16)
        out[f"M{m}"] = {kind: timed([call(kind, x, d, None) for d in ws]) for kind in FP8_KINDS}
    return out


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
          + " | ".join(f"{k:>11s} def/best us  GB/s    x" for k in KINDS))
    shapes = {**SHAPES, **EXTRA_SHAPES}
    for name, (n, k) in shapes.items():
        r = rows[name] = sweep_shape(n, k, KINDS if name in SHAPES else FP8_KINDS)
        cells = [f"{r[q]['default_us']:11.1f}/{r[q]['best_us']:6.1f} {r[q]['GBps']:5.0f} "
                 f"{r[q]['speedup_vs_bf16']:4.2f}" if q in r else f"{'-':>29s}"
                 for q in KINDS]
        print(f"{name:8s} {n:6d} {k:6d} | {r['bf16']['us']:8.1f} {r['bf16']['GBps']:5.0f} | "
              + " | ".join(cells), flush=True)
        for q in KINDS:
            if q in r and q != "int4_asym":
                print(f"    {q:11s} best {r[q]['best_cfg']:32s} {r[q]['best_us']:7.2f} us"
                      f"   default {r[q]['default_cfg']:32s} {r[q]['default_us']:7.2f} us")
    layer = {"bf16": sum(rows[s]["bf16"]["us"] for s in SHAPES)}
    layer_bytes = {"bf16": sum(n * k * 2 for n, k in SHAPES.values())}
    for q in KINDS:
        if all(q in rows[s] for s in SHAPES):
            for which in ("default", "best"):
                layer[f"{q}_{which}"] = sum(rows[s][q][f"{which}_us"] for s in SHAPES)
                layer_bytes[f"{q}_{which}"] = sum(rows[s][q]["bytes"] for s in SHAPES)
    layer_tbps = {key: layer_bytes[key] / us / 1e6 for key, us in layer.items()}
    print("per layer (qkv + o + gate_up + down): "
          + ", ".join(f"{key} {us:.1f} us {layer_tbps[key]:.2f} TB/s ({layer['bf16'] / us:.2f}x)"
                      for key, us in layer.items()))
    if not CAST_ONLY:
        print("fp8_dot best config per shape (for fp8_dot_gemv_config): "
              + ", ".join(f"{s} {rows[s]['fp8_dot']['best_cfg']} "
                          f"({rows[s]['fp8_dot']['best_us']:.1f} us, default "
                          f"{rows[s]['fp8_dot']['default_us']:.1f})"
                          for s in shapes if "fp8_dot" in rows[s]))
    fp8_m = fp8_rows()
    print("fp8 at M rows, default configs: " + ", ".join(
        f"{m} " + "/".join(f"{rec[q]:.1f}" for q in FP8_KINDS) for m, rec in fp8_m.items())
        + "   (" + "/".join(FP8_KINDS) + " us)")
    cross = {}
    if not FP8_ONLY:
        cross = rows_crossover()
        print("rows: " + ", ".join(f"{k} " + "/".join(f"{v:.1f}" for v in rec.values())
                                   for k, rec in cross.items()) + "   (gemv/gemm us)")
    print(json.dumps({"bench": "quant_gemv", "device": device, "hbm_peak_TBps": HBM_TBPS,
                      "workload": "Llama-3.1-8B linears, batch 1, bf16 activations, "
                                  "weights cycled past L2; FP8 W8A8 times include quantizing x",
                      "argv": sys.argv[1:], "shapes": rows, "layer_us": layer,
                      "layer_TBps": layer_tbps, "fp8_rows_us": fp8_m,
                      "rows_crossover": cross}))


if __name__ == "__main__":
    main()
