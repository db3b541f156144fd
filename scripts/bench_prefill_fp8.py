"""Prefill attention over an FP8 (e4m3) KV cache on CUDA: the bf16 cache, the FP8 cache
read as fp16 (K and V converted in the kernel), and the FP8 cache with Q K^T on FP8 tensor
cores (`fp8_qk`: Q scaled a row at a time), over tile configs. Llama-3.1-8B heads (32/8 of
128), paged cache (block tables shuffled). Each FP8 output is compared with the bf16
kernel over the dequantized cache (the same K/V values in bf16).

    python scripts/bench_prefill_fp8.py [--json FILE]

Cases: two 4096-token prompts in one step (the long-context throughput workload's steps),
a 2048-token chunk after a 6144-token cached prefix. TFLOP/s counts causal work.
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

CASES = [("2 x 4096 prompts", [4096, 4096], [4096, 4096]),
         ("2048 after 6144", [2048], [8192])]
CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2),
           (64, 64, 4, 3), (128, 64, 4, 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = []
    for name, q_lens, s_lens in CASES:
        cache, query, _, _, metas = make_case(q_lens, s_lens, seed=len(q_lens))
        m = metas[0]
        cache8 = cache.to(torch.float8_e4m3fn)
        deq = cache8.to(torch.bfloat16)
        flops = sum(causal_flops(q, s) for q, s in zip(q_lens, s_lens))
        ref = torch.empty_like(query)

        def run(kv, out, cfg, **kw):
            return prefill_attention(query, kv, out, m.query_start_loc, m.seq_lens,
                                     m.block_tables, SCALE, max(q_lens), config=cfg, **kw)

        run(deq, ref, None)
        variants = [("bf16", deq, {})]
        variants += [("fp8", cache8, {"fp8_qk": False}), ("fp8_qk", cache8, {"fp8_qk": True})]
        for label, kv, kw in variants:
            for cfg in CONFIGS:
                out = torch.empty_like(query)
                row = {"case": name, "kv": label, "config": cfg}
                try:
                    run(kv, out, cfg, **kw)
                    ms = time_launch(lambda: run(kv, out, cfg, **kw))
                    err = (out.float() - ref.float())
                    row |= {"ms": ms, "TFLOPs": flops / ms / 1e9,
                            "max_abs_err": err.abs().max().item(),
                            "rel_rms_err": (err.pow(2).mean().sqrt()
                                            / ref.float().pow(2).mean().sqrt()).item()}
                except Exception as exc:  # e.g. out of shared memory
                    row["error"] = repr(exc)[:200]
                rows.append(row)
                if "error" in row:
                    print(f"{name:<18} {label:<7} {cfg}  {row['error']}", flush=True)
                else:
                    print(f"{name:<18} {label:<7} {cfg}  {row['ms']:8.3f} ms "
                          f"{row['TFLOPs']:6.0f} TFLOP/s  max err {row['max_abs_err']:.4f} "
                          f"rel rms {row['rel_rms_err']:.5f}", flush=True)
    emit(rows, args.json)


if __name__ == "__main__":
    main()
