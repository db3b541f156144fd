"""Decode attention (kernels/triton/decode.py) alone: microseconds per call in a CUDA graph,
over tile configs and the shortest partition (min_part), at batch 1 and short contexts (a
batch-1 decode step is latency-bound there) and at batch 256 x 4096 (bandwidth-bound, bf16
against an FP8 cache). Each point is checked against the PyTorch reference first.

    python scripts/bench_decode_attention.py [--quick] [--case SUBSTR] [--json F]

Prints a table per case and one JSON line."""

from __future__ import annotations

import argparse
import json

import torch

from tandem.bench.decode_inputs import decode_batch
from tandem.bench.timing import graph_us
from tandem.kernels import reference
from tandem.kernels.triton import decode
from tandem.kernels.triton.decode import decode_attention

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--json", help="also write the JSON record here")
ap.add_argument("--quick", action="store_true",
                help="batch-1 cases only, the default against a serial merge (merge 1)")
ap.add_argument("--case", default="", help="only the cases whose name contains this")
ap.add_argument("--configs", help="the configs to try at every batch size, as a Python list "
                "of tuples (BLOCK_N, warps, stages, min_part[, merge[, rounds[, parts]]])")
args = ap.parse_args()


CASES = [  # name, seqs, ctx, kv heads, q heads, cache dtype, graph max_seq_len
    ("llama8b-b1-ctx256", 1, 256, 8, 32, torch.bfloat16, 1024),
    ("llama8b-b1-ctx512", 1, 512, 8, 32, torch.bfloat16, 1024),
    ("llama8b-b1-ctx1024", 1, 1024, 8, 32, torch.bfloat16, 4096),
    ("llama8b-b1-ctx2048", 1, 2048, 8, 32, torch.bfloat16, 4096),
    ("llama8b-b1-ctx8192", 1, 8192, 8, 32, torch.bfloat16, 8192),
    ("qwen3moe-b1-ctx256", 1, 256, 4, 32, torch.bfloat16, 1024),
    ("qwen3moe-b1-ctx512", 1, 512, 4, 32, torch.bfloat16, 1024),
    ("qwen3moe-b1-ctx4096", 1, 4096, 4, 32, torch.bfloat16, 4096),
    ("llama8b-b8-ctx1024", 8, 1024, 8, 32, torch.bfloat16, 4096),
    ("llama8b-b1-ctx2048-fp8", 1, 2048, 8, 32, torch.float8_e4m3fn, 4096),
    ("llama8b-b8-ctx1024-fp8", 8, 1024, 8, 32, torch.float8_e4m3fn, 4096),
    ("llama8b-b64-ctx4096-fp8", 64, 4096, 8, 32, torch.float8_e4m3fn, 4352),
    ("llama8b-b128-ctx4096-fp8", 128, 4096, 8, 32, torch.float8_e4m3fn, 4352),
    ("llama8b-b192-ctx4096-fp8", 192, 4096, 8, 32, torch.float8_e4m3fn, 4352),
    ("llama8b-b256-ctx4096-bf16", 256, 4096, 8, 32, torch.bfloat16, 4352),
    ("llama8b-b256-ctx4096-fp8", 256, 4096, 8, 32, torch.float8_e4m3fn, 4352),
]
CONFIGS = [None, (64, 4, 3, 128, 1), (64, 4, 3, 64), (64, 4, 3, 64, 1), (32, 4, 2, 64),
           (128, 8, 2, 128), (64, 4, 3, 256), (64, 4, 3, 512), (64, 4, 3, 1024),
           (64, 8, 3, 512), (128, 8, 2, 512), (128, 8, 3, 512), (32, 4, 4, 512),
           (64, 4, 4, 512), (128, 4, 2, 512)]
BIG = (None, (64, 4, 3, 64), (128, 8, 2, 128), (64, 8, 3, 512), (128, 8, 2, 512),
       (64, 4, 4, 512), (32, 4, 3, 32))
# (BLOCK_N, warps, stages, min_part[, merge[, rounds]]); merge 1: the last partition merges
# one partition a round (the kernel before 2026-12-02), else merge_width's rounds; rounds:
# decode.MAX_ROUNDS for that point (64: in effect no cap; (64, 4, 3, 128, None, 64) is the
# kernel before the tenth session); parts: that many partitions a sequence, whatever
# decode_num_partitions would pick (at batch 256 it picks 1). Big batches only try BIG.
if args.quick:
    CASES = [c for c in CASES if c[1] == 1]
    CONFIGS = [None, (64, 4, 3, 128, None, 64), (64, 4, 3, 64, None, 64),
               (64, 4, 3, 128, 1, 64)]
CASES = [c for c in CASES if args.case in c[0]]
if args.configs:
    CONFIGS = BIG = [None if c is None else tuple(c) for c in eval(args.configs)]
rows = []
for name, seqs, ctx, kvh, h, dtype, max_len in CASES:
    q, cache, meta, scale = decode_batch(seqs, ctx, kvh, h, dtype, seed=len(rows))
    ref = reference.paged_attention(q.float(), cache.float() if dtype != torch.float8_e4m3fn
                                    else cache, meta, 128 ** -0.5, kv_scale=scale)
    kv_bytes = seqs * ctx * kvh * 128 * 2 * cache.element_size()
    print(f"\n{name}: {kv_bytes / 1e6:.1f} MB of K/V")
    for cfg in CONFIGS:
        if seqs > 8 and cfg not in BIG:
            continue
        out = torch.empty_like(q)
        kw = dict(max_seq_len=max_len, kv_scale=scale)
        rounds = decode.MAX_ROUNDS
        if cfg is not None:
            kw.update(config=cfg[:3], min_part=cfg[3], merge=cfg[4] if len(cfg) > 4 else None)
            rounds = cfg[5] if len(cfg) > 5 and cfg[5] else rounds
            if len(cfg) > 6 and cfg[6]:
                kw.update(num_parts=cfg[6])

        def call(out=out, kw=kw, rounds=rounds):
            saved, decode.MAX_ROUNDS = decode.MAX_ROUNDS, rounds
            try:
                decode_attention(q, cache, out, meta.query_start_loc, meta.seq_lens,
                                 meta.block_tables, 128 ** -0.5, **kw)
            finally:
                decode.MAX_ROUNDS = saved
        try:
            call()
            err = (out.float() - ref.float()).abs().max().item()
            if err > 3e-2 * max(1.0, ref.abs().max().item()):
                print(f"  {cfg}: WRONG (max err {err:.3g})")
                continue
            us = graph_us(call, calls=32, repeats=5, best=True)
        except Exception as e:  # out of resources
            print(f"  {cfg}: {type(e).__name__}: {str(e)[:80]}")
            continue
        rows.append({"case": name, "config": cfg, "us": us, "kv_MB": kv_bytes / 1e6,
                     "GBps": kv_bytes / us / 1e3})
        print(f"  {str(cfg):<22} {us:8.2f} us  {kv_bytes / us / 1e3:8.0f} GB/s")
rec = {"bench": "decode_attention", "device": torch.cuda.get_device_name(),
       "config_fields": "(BLOCK_N, num_warps, num_stages, min_part[, merge[, max rounds"
                        "[, partitions]]]); "
                        "null: the default",
       "rows": rows}
print(json.dumps(rec))
if args.json:
    with open(args.json, "w") as f:
        json.dump(rec, f)
