"""Where an offline throughput run's GPU time goes. Runs `tandem bench throughput ARGS`'s
workload (same prompts, same warm-up) under a CUDA-only profiler and prints: wall time, GPU
busy time (the union of kernel and copy intervals), the idle gaps between them, and kernel
time by kind (GEMM, decode attention, prefill attention, norms, activation, rotary/KV write,
sampling, copies, the rest), then the top kernels. One JSON line last.

    python scripts/diag_gpu_time.py --model bench/configs/llama-3.1-8b --load-format dummy \
        --num-prompts 1024 --input-len 512 --output-len 256 --max-model-len 1024 \
        --max-num-seqs 512
"""

from __future__ import annotations

import collections
import json
import re
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tandem.bench import cli as bench_cli
from tandem.cli import build_parser

KINDS = [  # first match wins
    ("decode attention", r"_decode|decode_attn|merge"),
    ("prefill attention", r"_prefill_kernel|flash|fmha"),
    ("gemm", r"nvjet|gemm|cutlass|xmma|_matmul|gemv|cublas|sm90_"),
    ("norm", r"rms_norm|norm"),
    ("activation", r"silu|gelu"),
    ("rotary / kv write", r"rotary|write_kv|kv_write|reshape_and_cache"),
    ("sampling", r"argmax|sample|topk|top_k|softmax|logsumexp|gumbel|exponential"),
    ("copy / memset", r"^Memcpy|^Memset|copy"),
]


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def gpu_events(prof, device_type) -> list[tuple[str, int, int]]:
    """(name, start ns, end ns) of every device-side activity (kernels, copies, memsets)."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != device_type:
            continue
        start = e.start_ns()
        out.append((e.name(), start, start + e.duration_ns()))
    return out


def summarize(events: list[tuple[str, int, int]], wall_s: float) -> dict:
    events.sort(key=lambda e: e[1])
    busy = 0
    gaps = collections.Counter()  # idle gaps by size class
    gap_time = collections.Counter()
    big = collections.Counter()  # gaps over 1 ms by (kernel before, kernel after)
    big_time = collections.Counter()
    cur_s, cur_e, last = None, None, ""
    for name, s, e in events:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                gap = s - cur_e
                if gap >= 1_000_000:
                    big[(last[:50], name[:50])] += 1
                    big_time[(last[:50], name[:50])] += gap
                cls = ("<10us" if gap < 10_000 else "10-100us" if gap < 100_000
                       else "0.1-1ms" if gap < 1_000_000 else ">1ms")
                gaps[cls] += 1
                gap_time[cls] += gap
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
        if e >= cur_e:
            last = name
    if cur_e is not None:
        busy += cur_e - cur_s
    span = (events[-1][2] - events[0][1]) if events else 0
    # Segments of device work split by gaps of 0.1 ms or more (about one step each): the
    # largest gaps with the segments on either side (a decode step or a prefill step).
    segs, seg_s, seg_e = [], None, None
    for _, s, e in events:
        if seg_e is not None and s - seg_e >= 100_000:
            segs.append((seg_s, seg_e))
            seg_s = None
        seg_s = s if seg_s is None else seg_s
        seg_e = e if seg_e is None else max(seg_e, e)
    if seg_s is not None:
        segs.append((seg_s, seg_e))
    around = sorted(((segs[i + 1][0] - segs[i][1], segs[i][1] - segs[i][0],
                      segs[i + 1][1] - segs[i + 1][0]) for i in range(len(segs) - 1)),
                    reverse=True)[:12]
    by_kind = collections.Counter()
    by_name = collections.Counter()
    calls = collections.Counter()
    for name, s, e in events:
        by_kind[kind_of(name)] += e - s
        by_name[name] += e - s
        calls[name] += 1
    return {"wall_s": wall_s, "gpu_span_s": span / 1e9, "gpu_busy_s": busy / 1e9,
            "idle_gaps": {k: {"count": gaps[k], "s": gap_time[k] / 1e9} for k in gaps},
            "gaps_over_1ms": [{"before": b, "after": a, "count": big[(b, a)],
                               "s": big_time[(b, a)] / 1e9} for (b, a), _ in big.most_common(8)],
            "largest_gaps_ms": [{"gap": g / 1e6, "segment_before": b / 1e6,
                                 "segment_after": a / 1e6} for g, b, a in around],
            "kernel_s_by_kind": {k: v / 1e9 for k, v in by_kind.most_common()},
            "top_kernels": [{"name": n[:90], "calls": calls[n], "s": t / 1e9,
                             "avg_us": t / calls[n] / 1e3}
                            for n, t in by_name.most_common(25)]}


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(["bench", "throughput", *argv])
    llm = bench_cli._make_llm(args)
    prompts, in_lens, out_lens = bench_cli._throughput_workload(args, llm.engine.vocab_size)
    k = min(len(prompts), 64)  # warm-up on other prompts: none of the measured in the cache
    bench_cli.measure_tandem_throughput(
        llm, bench_cli._random_prompts(k, in_lens[:k], llm.engine.vocab_size, 999),
        [min(o, 16) for o in out_lens[:k]], warmup=True)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    cuda = torch.cuda.is_available()  # on a CPU the ops themselves (a smoke test)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        elapsed, tokens = bench_cli.measure_tandem_throughput(llm, prompts, out_lens,
                                                              warmup=False)
        sync()
    t = time.perf_counter()
    dt = torch.autograd.DeviceType
    s = summarize(gpu_events(prof, dt.CUDA if cuda else dt.CPU), elapsed)
    s |= {"output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
          "prompt_tokens": sum(in_lens), "argv": argv, "summary_s": time.perf_counter() - t}
    print(f"wall {elapsed:.2f} s, {tokens / elapsed:,.0f} output tok/s (profiled); GPU busy "
          f"{s['gpu_busy_s']:.2f} s of a {s['gpu_span_s']:.2f} s span")
    for k, g in sorted(s["idle_gaps"].items()):
        print(f"  idle gaps {k:>9}: {g['count']:7d}  {g['s']:7.3f} s")
    for g in s["gaps_over_1ms"]:
        print(f"  gaps > 1 ms: {g['count']:5d} x, {g['s']:.3f} s, after {g['before']} "
              f"before {g['after']}")
    for g in s["largest_gaps_ms"]:
        print(f"  gap {g['gap']:8.2f} ms between {g['segment_before']:8.2f} and "
              f"{g['segment_after']:8.2f} ms of device work")
    for k, v in s["kernel_s_by_kind"].items():
        print(f"  {k:<20} {v:8.3f} s  {v / max(s['gpu_busy_s'], 1e-9):6.1%}")
    for row in s["top_kernels"]:
        print(f"  {row['s']:8.3f} s {row['calls']:7d} x {row['avg_us']:9.1f} us  {row['name']}")
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
