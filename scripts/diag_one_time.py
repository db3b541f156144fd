"""One-time costs inside `tandem bench throughput`'s measured window. Runs the bench's own
sequence (its warm-up, then the measured batch) and then the measured batch's shape again on
other prompts, and for each window prints its time and what happened in it only once:

- Triton kernels compiled (a new specialization of a kernel: its name and compile seconds);
- cudaMalloc calls of torch's caching allocator (`num_device_alloc`), and their bytes;
- CUDA graphs captured by the runner.

A second window much faster than the first, with compiles or allocations in the first,
says the bench's warm-up leaves work inside the measurement. One JSON line last.

    python scripts/diag_one_time.py --model bench/configs/llama-3.1-8b --load-format dummy \
        --kv-cache-dtype fp8 --num-prompts 256 --input-len 4096 --output-len 256 \
        --max-model-len 4352 --max-num-seqs 256 --no-progress
"""

from __future__ import annotations

import json
import sys
import time

import torch

from tandem.bench import cli as bench_cli
from tandem.cli import build_parser

compiles: list[tuple[str, float, float, str]] = []  # (kernel, start, seconds, what)


def _watch_triton() -> None:
    """Record every Triton compile (kernel, start, seconds, signature and constexprs) by
    wrapping JITFunction._do_compile."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return
    inner = JITFunction._do_compile

    def do_compile(self, key, signature, device, constexprs, *args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(self, key, signature, device, constexprs, *args, **kwargs)
        finally:
            what = f"{signature} {constexprs}"
            compiles.append((self.__name__, t, time.perf_counter() - t, what))

    JITFunction._do_compile = do_compile


def _allocs() -> tuple[int, int]:
    if not torch.cuda.is_available():
        return 0, 0
    s = torch.cuda.memory_stats()
    return s.get("num_device_alloc", 0), s.get("reserved_bytes.all.allocated", 0)


def _captures(llm) -> int:
    graphs = getattr(llm.engine.runner, "graphs", None)
    return len(getattr(graphs, "graphs", {}) or {}) if graphs is not None else 0


def window(llm, name: str, run) -> dict:
    """Run `run` (-> elapsed, tokens) and report what happened in its last llm.generate call
    (the measured batch; a warm-up before it is left out)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    starts: list[tuple[float, tuple[int, int], int]] = []
    generate = llm.generate

    def timed_generate(*a, **k):
        sync()
        starts.append((time.perf_counter(), _allocs(), _captures(llm)))
        return generate(*a, **k)

    llm.generate = timed_generate
    try:
        elapsed, tokens = run()
        sync()
    finally:
        llm.generate = generate
    t, (a0, b0), g0 = starts[-1]
    wall = time.perf_counter() - t
    new = [(n, s, w) for n, t0, s, w in compiles if t0 >= t]
    a1, b1 = _allocs()
    rec = {"window": name, "elapsed_s": elapsed, "wall_s": wall, "output_tokens": tokens,
           "compiles": len(new), "compile_s": sum(s for _, s, _ in new),
           "compiled": sorted({n for n, _, _ in new}), "variants": [w for _, _, w in new],
           "cuda_mallocs": a1 - a0,
           "malloc_bytes": b1 - b0, "graphs_captured": _captures(llm) - g0}
    print(f"{name}: {elapsed:.2f} s ({tokens / elapsed:,.0f} output tok/s); Triton compiles "
          f"{rec['compiles']} ({rec['compile_s']:.2f} s: {', '.join(rec['compiled'])}); "
          f"cudaMalloc {rec['cuda_mallocs']} ({rec['malloc_bytes'] / 2**20:.0f} MiB); "
          f"graphs captured {rec['graphs_captured']}", flush=True)
    for w in rec["variants"]:
        print(f"  compiled: {w[:1500]}")
    return rec


def main(argv: list[str]) -> int:
    _watch_triton()
    args = build_parser().parse_args(["bench", "throughput", *argv])
    llm = bench_cli._make_llm(args)
    prompts, in_lens, out_lens = bench_cli._throughput_workload(args, llm.engine.vocab_size)
    print(f"start-up: {len(compiles)} Triton compiles ({sum(c[2] for c in compiles):.2f} s)")
    recs = [window(llm, "bench's measured batch (after its warm-up)",
                   lambda: bench_cli.measure_tandem_throughput(llm, prompts, out_lens,
                                                               args.warmup)),
            window(llm, "again, other prompts of the same lengths", lambda: (
                bench_cli.measure_tandem_throughput(
                    llm, bench_cli._random_prompts(len(prompts), in_lens,
                                                   llm.engine.vocab_size, 4242),
                    out_lens, warmup=False)))]
    print(json.dumps({"argv": argv, "windows": recs}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
