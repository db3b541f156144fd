"""Decode attention over two cache layouts, the same bytes: the engine's NHD blocks
(block_size, num_kv_heads, head_dim) against HND blocks (num_kv_heads, block_size,
head_dim), a prototype: decode.py with its addressing rewritten (HND_EDITS). In NHD a
program (one sequence, one KV head) reads a 128-byte FP8 row per slot, 1 KB apart; in HND
2 KB runs (block 16).
Each point is checked against the PyTorch reference; NHD and HND alternate, twice.

    python scripts/bench_decode_layout.py [--case SUBSTR] [--json F]

Prints a table and one JSON line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

import torch

import tandem.kernels.triton.decode as decode_nhd
from tandem.bench.decode_inputs import decode_batch
from tandem.bench.timing import graph_us
from tandem.kernels import reference
from tandem.kernels.triton.decode import decode_attention

# The HND prototype: the engine's decode.py with only its addressing rewritten (the fused
# new-token write, ROPE, is left NHD and refused). Each edit must apply exactly once.
HND_EDITS = [
    ("def _slots(table, offs, valid, BLOCK_SIZE: tl.constexpr):",
     "def _slots(table, offs, valid, BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr):"),
    ("    return blk.to(tl.int64) * BLOCK_SIZE + offs % BLOCK_SIZE",
     "    return blk.to(tl.int64) * (BLOCK_SIZE * NUM_KV_HEADS) + offs % BLOCK_SIZE"),
    ("             HEAD_DIM: tl.constexpr, FP8: tl.constexpr):",
     "             HEAD_DIM: tl.constexpr, FP8: tl.constexpr, BLOCK_SIZE: tl.constexpr):"),
    ("    off = slot[:, None] * (NUM_KV_HEADS * HEAD_DIM) + kvh * HEAD_DIM + d[None, :]",
     "    off = slot[:, None] * HEAD_DIM + kvh * (BLOCK_SIZE * HEAD_DIM) + d[None, :]"),
    ("start + tile < end, BLOCK_SIZE)", "start + tile < end, BLOCK_SIZE, NUM_KV_HEADS)"),
    ("ahead < end, BLOCK_SIZE)", "ahead < end, BLOCK_SIZE, NUM_KV_HEADS)"),
    ("NUM_KV_HEADS, HEAD_DIM, FP8)", "NUM_KV_HEADS, HEAD_DIM, FP8, BLOCK_SIZE)"),
    ("    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape\n",
     "    _, _, num_kv_heads, block_size, head_dim = kv_cache.shape\n    assert new is None\n"),
]


def load_hnd():
    src = open(decode_nhd.__file__).read()
    for old, new in HND_EDITS:
        assert src.count(old) == 1, f"decode.py changed: {old!r}"
        src = src.replace(old, new)
    path = os.path.join(tempfile.mkdtemp(), "decode_hnd.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("decode_hnd", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["decode_hnd"] = module  # (its dataclasses look themselves up there)
    spec.loader.exec_module(module)
    return module


decode_hnd = load_hnd()

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--json", help="also write the JSON record here")
ap.add_argument("--case", default="", help="only the cases whose name contains this")
args = ap.parse_args()
FP8 = torch.float8_e4m3fn
CASES = [  # name, seqs, ctx, cache dtype, graph max_seq_len, configs
    ("b1-ctx2048-fp8", 1, 2048, FP8, 4096, [(128, 4, 2)]),
    ("b8-ctx1024-fp8", 8, 1024, FP8, 4096, [(128, 4, 2)]),
    ("b64-ctx4096-fp8", 64, 4096, FP8, 4352, [(128, 4, 2), (128, 4, 3)]),
    ("b128-ctx4096-fp8", 128, 4096, FP8, 4352, [(128, 4, 2), (128, 4, 3)]),
    ("b256-ctx4096-fp8", 256, 4096, FP8, 4352, [(128, 4, 2), (128, 4, 3), (64, 4, 3)]),
    ("b1-ctx2048-bf16", 1, 2048, torch.bfloat16, 4096, [(64, 4, 2)]),
    ("b256-ctx4096-bf16", 256, 4096, torch.bfloat16, 4352, [(64, 4, 2), (64, 4, 3)]),
]


rows = []
for name, seqs, ctx, dtype, max_len, configs in CASES:
    if args.case not in name:
        continue
    q, nhd, meta, scale = decode_batch(seqs, ctx, 8, 32, dtype, seed=len(rows))
    hnd = nhd.transpose(2, 3).contiguous()  # (2, blocks, heads, block_size, D)
    ref = reference.paged_attention(q.float(), nhd.float() if dtype != FP8 else nhd, meta,
                                    128 ** -0.5, kv_scale=scale)
    kv_bytes = seqs * ctx * 8 * 128 * 2 * nhd.element_size()
    print(f"\n{name}: {kv_bytes / 1e6:.1f} MB of K/V")
    for cfg in configs:
        for layout in ("NHD", "HND", "NHD", "HND"):
            fn, cache = (decode_attention, nhd) if layout == "NHD" else (
                decode_hnd.decode_attention, hnd)
            out = torch.empty_like(q)

            def call(fn=fn, cache=cache, out=out, cfg=cfg):
                fn(q, cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                   128 ** -0.5, max_seq_len=max_len, kv_scale=scale, config=cfg)
            call()
            err = (out.float() - ref.float()).abs().max().item()
            if err > 3e-2 * max(1.0, ref.abs().max().item()):
                print(f"  {layout} {cfg}: WRONG (max err {err:.3g})")
                continue
            us = graph_us(call, calls=32, repeats=5, best=True)
            rows.append({"case": name, "layout": layout, "config": cfg, "us": us,
                         "GBps": kv_bytes / us / 1e3})
            print(f"  {layout} {str(cfg):<14} {us:8.2f} us  {kv_bytes / us / 1e3:8.0f} GB/s")
rec = {"bench": "decode_layout", "device": torch.cuda.get_device_name(), "rows": rows}
print(json.dumps(rec))
if args.json:
    with open(args.json, "w") as f:
        json.dump(rec, f)
