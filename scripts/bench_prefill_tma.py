"""Fresh-prompt prefill attention (kernels/triton/prefill.py) with its Q/K/V tiles fetched
through Hopper tensor descriptors (TMA) against pointer loads, over tile configs.
Llama-3.1-8B heads (32/8 of 128), bf16, K/V read straight from this step's rows (the FRESH
path of a prompt with no cached prefix).

    python scripts/bench_prefill_tma.py [--json F]

Cases: one 8192-token prompt (the 8k prefill benchmark), two 4096-token prompts. Prints ms,
TFLOP/s of causal work and the largest difference from the pointer loads at the default
config, then one JSON line. (At f0ddd50 the first version of this probe carried its own
TMA kernel: 1.124 -> 1.070 ms and 0.637 -> 0.574 ms;
bench/results/2026-12-02-h200-fifteenth-833fd27/.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "kernels"))
from attention_bench import (SCALE, causal_flops, emit, make_case,  # noqa: E402
                             time_launch)

from tandem.kernels.triton import prefill_attention  # noqa: E402

CASES = [("1 x 8192", [8192]), ("2 x 4096", [4096, 4096])]
CONFIGS = [None, (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 4, 3)]  # None: the default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--configs", help="tile configs instead of the usual ones: "
                    "'BLOCK_M,BLOCK_N,warps,stages;...' ('default' for the default)")
    ap.add_argument("--qkv-views", action="store_true",
                    help="Q, K and V as strided views of one fused QKV output, as in the model")
    ap.add_argument("--cases", type=int, default=len(CASES), help="the first N cases")
    args = ap.parse_args()
    configs = CONFIGS if not args.configs else [
        None if c == "default" else tuple(int(x) for x in c.split(","))
        for c in args.configs.split(";")]
    if configs[0] is not None:  # the default first: the others are compared with it
        configs = [None] + [c for c in configs if c is not None]
    rows = []
    for name, lens in CASES[:args.cases]:
        cache, query, key, value, metas = make_case(lens, lens, seed=len(lens))
        if args.qkv_views:  # rows of (H + 2 Hkv) D, as qkv_proj writes them
            t, h, d = query.shape
            qkv = torch.cat([x.reshape(t, -1) for x in (query, key, value)], 1)
            query, key, value = (x.view(t, -1, d) for x in qkv.split(
                [h * d, key.shape[1] * d, value.shape[1] * d], 1))
        m = metas[0]
        flops = sum(causal_flops(n, n) for n in lens)
        baseline = torch.empty_like(query)
        for cfg in configs:
            for mode, tma in (("ptr", False), ("tma", True)):
                out = baseline if cfg is None and not tma else torch.empty_like(query)

                def run(out=out, cfg=cfg, tma=tma):
                    prefill_attention(query, cache, out, m.query_start_loc, m.seq_lens,
                                      m.block_tables, SCALE, max(lens), key=key, value=value,
                                      config=cfg, tma=tma)
                try:
                    run()
                    ms = time_launch(run)
                except Exception as exc:  # e.g. out of shared memory or registers
                    print(f"{name:<10} {str(cfg):<18} {mode}  failed: {repr(exc)[:100]}",
                          flush=True)
                    continue
                err = (out.float() - baseline.float()).abs().max().item()
                rows.append({"case": name, "config": cfg, "tma": tma, "ms": ms,
                             "TFLOPs": flops / ms / 1e9, "max_abs_err": err})
                print(f"{name:<10} {str(cfg or 'default'):<18} {mode:<4} "
                      f"{ms:7.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s  max diff {err:.4f}",
                      flush=True)
    emit(rows, args.json)


if __name__ == "__main__":
    main()
