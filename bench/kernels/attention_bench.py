"""Micro-benchmark of the Triton attention kernels against the PyTorch reference (CUDA).

    python bench/kernels/attention_bench.py [--sweep] [--out FILE] [--commit SHA]

Llama-3.1-8B attention shapes: 32 query heads, 8 KV heads, head_dim 128, bfloat16,
block_size 16, block tables shuffled over the pool.

    decode   batch 1 at context 256 / 4k / 32k, batch 64 at 1k:
             GB/s = K/V bytes read (batch * ctx * 8 heads * 128 * 2 (K,V) * 2 B) / time
    prefill  one causal 8192-token prompt (fresh k/v rows, and through the paged cache), and
             a 2048-token chunk after a 6144-token cached prefix:
             TFLOP/s = 4 * heads * head_dim * (visible keys summed over query rows) / time

Times are medians. `launch`: triton.testing.do_bench, one call per timing with L2 flushed
before it (the backend's host-side Python and launch overhead included, so it is noisy for
small cases). `graph`: a CUDA graph of N calls, each on its own
copy of the K/V (N copies span >= 256 MB, so L2 holds none), replayed; time per call.
The hardware bounds (a 1 GiB device copy counting read + write; an 8192^3 bf16 matmul) are
measured first. Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys

import torch
import triton
from triton.testing import do_bench

from tandem.bench.roofline import measure_rates
from tandem.kernels import TorchReferenceBackend, kv_cache_shape
from tandem.kernels.triton import (TritonAttentionBackend, decode_attention,
                                   decode_num_partitions, prefill_attention)
from tandem.layers.attention_metadata import AttentionMetadata

HEADS, KV_HEADS, HEAD_DIM, BLOCK, DTYPE = 32, 8, 128, 16, torch.bfloat16
DEV = torch.device("cuda")
SCALE = HEAD_DIM ** -0.5


def make_meta(q_lens: list[int], s_lens: list[int], tables: list[list[int]]) -> AttentionMetadata:
    slots, starts = [], [0]
    for q, s, t in zip(q_lens, s_lens, tables):
        slots += [t[p // BLOCK] * BLOCK + p % BLOCK for p in range(s - q, s)]
        starts.append(starts[-1] + q)
    width = max(len(t) for t in tables)
    i32 = dict(dtype=torch.int32, device=DEV)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEV),
        query_start_loc=torch.tensor(starts, **i32), seq_lens=torch.tensor(s_lens, **i32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], **i32),
        query_lens_cpu=q_lens, seq_lens_cpu=s_lens, max_query_len=max(q_lens),
        max_seq_len=max(s_lens), block_size=BLOCK)


def make_case(q_lens: list[int], s_lens: list[int], copies: int = 1, seed: int = 0):
    """One K/V cache holding `copies` disjoint copies of the batch's blocks -> cache,
    query, key, value, metas (one per copy, each with its own shuffled block tables)."""
    rng = random.Random(seed)
    need = [-(-s // BLOCK) for s in s_lens]
    pool = list(range(sum(need) * copies))
    rng.shuffle(pool)
    metas = []
    for _ in range(copies):
        metas.append(make_meta(q_lens, s_lens, [[pool.pop() for _ in range(n)] for n in need]))
    cache = torch.randn(kv_cache_shape(sum(need) * copies, BLOCK, KV_HEADS, HEAD_DIM),
                        device=DEV, dtype=DTYPE)
    tokens = sum(q_lens)
    query = torch.randn(tokens, HEADS, HEAD_DIM, device=DEV, dtype=DTYPE)
    key = torch.randn(tokens, KV_HEADS, HEAD_DIM, device=DEV, dtype=DTYPE)
    value = torch.randn(tokens, KV_HEADS, HEAD_DIM, device=DEV, dtype=DTYPE)
    return cache, query, key, value, metas


def emit(rows: list[dict], path: str | None) -> None:
    """The scripts' JSON record: {device, rows}, printed as one line (and written to path)."""
    record = json.dumps({"device": torch.cuda.get_device_name(), "rows": rows})
    if path:
        with open(path, "w") as f:
            f.write(record)
    print(record)


def time_launch(fn) -> float:
    """Median ms per call, L2 flushed before each."""
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def time_graph(fns: list, replays: int = 20) -> float:
    """Median ms per call over graph replays of all fns in sequence."""
    for fn in fns[:2]:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(fns))
    return statistics.median(times)


def decode_case(batch: int, ctx: int, triton_backend, ref_backend) -> dict:
    kv_bytes = batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2
    copies = max(1, -(-(256 << 20) // kv_bytes))
    cache, query, _, _, metas = make_case([1] * batch, [ctx] * batch, copies, seed=ctx + batch)
    fns = [lambda m=m: triton_backend.forward(query, cache, m, SCALE) for m in metas]
    graph_ms = time_graph(fns)
    launch_ms = time_launch(fns[0])
    ref_ms = time_launch(lambda: ref_backend.forward(query, cache, metas[0], SCALE))
    parts = decode_num_partitions(ctx, batch, KV_HEADS, torch.cuda.get_device_properties(DEV)
                                  .multi_processor_count)
    return {"batch": batch, "ctx": ctx, "kv_bytes": kv_bytes, "num_parts": parts,
            "graph_ms": graph_ms, "graph_GBps": kv_bytes / graph_ms / 1e6,
            "launch_ms": launch_ms, "launch_GBps": kv_bytes / launch_ms / 1e6,
            "reference_ms": ref_ms, "reference_GBps": kv_bytes / ref_ms / 1e6}


def causal_flops(q_len: int, s_len: int) -> int:
    ctx = s_len - q_len
    visible = q_len * ctx + q_len * (q_len + 1) // 2  # row j sees ctx + j + 1 keys
    return 4 * HEADS * HEAD_DIM * visible


def prefill_case(name: str, q_len: int, s_len: int, triton_backend, ref_backend,
                 fresh: bool) -> dict:
    cache, query, key, value, metas = make_case([q_len], [s_len], seed=q_len)
    kv = (key, value) if fresh else (None, None)
    ms = time_launch(lambda: triton_backend.forward(query, cache, metas[0], SCALE, *kv))
    ref_ms = time_launch(lambda: ref_backend.forward(query, cache, metas[0], SCALE, *kv))
    flops = causal_flops(q_len, s_len)
    return {"case": name, "query_len": q_len, "seq_len": s_len, "fresh_kv": fresh,
            "flops": flops, "ms": ms, "TFLOPs": flops / ms / 1e9,
            "reference_ms": ref_ms, "reference_TFLOPs": flops / ref_ms / 1e9}


def sweep() -> dict:
    """Prefill tiles (fresh and paged 8k prompt, block-table prefetch on/off); decode tiles
    and partition counts at batch 1 (graph timing)."""
    out: dict = {"prefill": [], "decode": []}
    cache, query, key, value, metas = make_case([8192], [8192], seed=1)
    m, res = metas[0], torch.empty_like(query)
    flops = causal_flops(8192, 8192)
    runs = [(cfg, True, False) for cfg in [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                                           (128, 128, 8, 2), (128, 32, 4, 3)]]
    runs += [(cfg, False, pre) for cfg in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 3),
                                           (64, 64, 4, 3)] for pre in (False, True)]
    for cfg, fresh, pre in runs:
        kv = dict(key=key, value=value) if fresh else {}
        try:
            ms = time_launch(lambda: prefill_attention(
                query, cache, res, m.query_start_loc, m.seq_lens, m.block_tables, SCALE,
                8192, config=cfg, prefetch_table=pre, **kv))
            out["prefill"].append({"config": cfg, "fresh_kv": fresh, "prefetch": pre, "ms": ms,
                                   "TFLOPs": flops / ms / 1e9})
        except Exception as exc:  # e.g. out of shared memory
            out["prefill"].append({"config": cfg, "fresh_kv": fresh, "error": repr(exc)[:80]})
    for batch, ctx in ((1, 4096), (1, 32768), (64, 1024)):
        kv_bytes = batch * ctx * KV_HEADS * HEAD_DIM * 4
        copies = max(1, -(-(256 << 20) // kv_bytes))
        cache, query, _, _, metas = make_case([1] * batch, [ctx] * batch, copies, seed=ctx)
        res = torch.empty_like(query)
        runs = [(None, p) for p in ((8, 16, 33, 132) if batch == 1 else ())]
        runs += [(c, None) for c in ((32, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 2),
                                     (64, 2, 3))]
        for cfg, parts in runs:
            fns = [lambda m=m, c=cfg, p=parts: decode_attention(
                query, cache, res, m.query_start_loc, m.seq_lens, m.block_tables, SCALE,
                ctx, num_parts=p, config=c) for m in metas]
            ms = time_graph(fns)
            out["decode"].append({"batch": batch, "ctx": ctx, "num_parts": parts,
                                  "config": cfg, "graph_ms": ms,
                                  "graph_GBps": kv_bytes / ms / 1e6})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also sweep tiles and partitions")
    ap.add_argument("--out", help="also write the JSON object to this file")
    ap.add_argument("--commit", default="unknown", help="commit of the code measured")
    args = ap.parse_args()
    torch.manual_seed(0)
    flops_rate, bw = measure_rates(DEV, DTYPE)
    tb, rb = TritonAttentionBackend(), TorchReferenceBackend()
    decode = [decode_case(b, c, tb, rb) for b, c in [(1, 256), (1, 4096), (1, 32768), (64, 1024)]]
    prefill = [prefill_case("prompt 8192, fresh k/v", 8192, 8192, tb, rb, True),
               prefill_case("prompt 8192, paged cache", 8192, 8192, tb, rb, False),
               prefill_case("chunk 2048 after 6144 cached", 2048, 8192, tb, rb, False)]
    swept = sweep() if args.sweep else None

    print(f"device {torch.cuda.get_device_name(DEV)}; copy {bw / 1e9:.0f} GB/s (read+write), "
          f"bf16 matmul {flops_rate / 1e12:.0f} TFLOP/s")
    print(f"{'decode':<16}{'parts':>6}{'graph ms':>10}{'GB/s':>8}{'launch ms':>11}{'GB/s':>8}"
          f"{'ref ms':>9}{'GB/s':>8}")
    for d in decode:
        print(f"{'b%d ctx %d' % (d['batch'], d['ctx']):<16}{d['num_parts']:>6}"
              f"{d['graph_ms']:>10.4f}{d['graph_GBps']:>8.0f}{d['launch_ms']:>11.4f}"
              f"{d['launch_GBps']:>8.0f}{d['reference_ms']:>9.3f}{d['reference_GBps']:>8.0f}")
    print(f"{'prefill':<32}{'ms':>9}{'TFLOP/s':>9}{'ref ms':>9}{'TFLOP/s':>9}")
    for p in prefill:
        print(f"{p['case']:<32}{p['ms']:>9.3f}{p['TFLOPs']:>9.0f}{p['reference_ms']:>9.3f}"
              f"{p['reference_TFLOPs']:>9.0f}")
    if swept:
        for s in swept["prefill"]:
            print("sweep prefill", s)
        for s in swept["decode"]:
            print("sweep decode", s)
    result = {
        "bench": "attention_kernels", "device": torch.cuda.get_device_name(DEV),
        "date": datetime.date.today().isoformat(), "commit": args.commit,
        "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
        "triton": triton.__version__,
        "shape": {"num_heads": HEADS, "num_kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "block_size": BLOCK, "dtype": "bfloat16"},
        "bounds": {"copy_GBps": bw / 1e9, "matmul_TFLOPs": flops_rate / 1e12},
        "decode": decode, "prefill": prefill, "sweep": swept}
    line = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(result, indent=1) + "\n")
    print(line)


if __name__ == "__main__":
    main()
