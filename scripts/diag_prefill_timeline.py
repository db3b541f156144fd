"""Where a long prompt's TTFT goes outside the GPU's kernels. One prompt for one token, under
the profiler, with the engine's host phases marked (add_request, schedule, inputs, forward
launch, sampler, the wait, the step's bookkeeping); prints, on one timeline: the host time
before the first kernel starts, the GPU idle gaps between kernels (the largest, with the
kernels around them), the time after the last kernel ends, and the host phases' sums.

    python scripts/diag_prefill_timeline.py [MODEL_DIR] [--input-len 8192] [--trace F.json]
        [--events N] [--cprofile N]

--events N: then N unprofiled runs with a CUDA event and the host clock at each mark
(the profiler's own cost per op inflates the host phases above). On a machine without
CUDA the CPU ops stand in for kernels, for a smoke run.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from tandem import LLM, SamplingParams
from tandem.runner import model_runner

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("model", nargs="?", default="bench/configs/llama-3.1-8b")
ap.add_argument("--input-len", type=int, default=8192)
ap.add_argument("--runs", type=int, default=5, help="unprofiled runs (wall median)")
ap.add_argument("--gaps", type=int, default=8, help="largest GPU gaps listed")
ap.add_argument("--trace", help="also keep the chrome trace here")
ap.add_argument("--events", type=int, default=0, metavar="N",
                help="then N unprofiled runs timed with CUDA events at the phase marks")
ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                help="then one run under cProfile: its N functions of most own time")
args = ap.parse_args()

llm = LLM(args.model, load_format="dummy", max_model_len=args.input_len + 256,
          max_num_seqs=1, max_num_batched_tokens=max(8192, args.input_len))
one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
vocab = llm.engine.vocab_size
prompt = lambda k: [[(100 + k + i) % vocab for i in range(args.input_len)]]  # noqa: E731


def marked(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        with record_function(name):
            return fn(*a, **kw)
    return wrapper


engine, runner = llm.engine, llm.engine.runner
engine.add_request = marked("phase:add_request", engine.add_request)
engine.scheduler.schedule = marked("phase:schedule", engine.scheduler.schedule)
engine._finish_step = marked("phase:finish_step", engine._finish_step)
model_runner.build_model_inputs = marked("phase:inputs", model_runner.build_model_inputs)
model_runner.build_sampling_tensors = marked("phase:sampling_inputs",
                                             model_runner.build_sampling_tensors)
runner.model.forward = marked("phase:forward_launch", runner.model.forward)
runner.sampler = marked("phase:sampler", runner.sampler)
runner._collect = marked("phase:collect_wait", runner._collect)

llm.generate(prompt(0), one, use_tqdm=False)  # warm-up: compiles the prefill shapes
walls = []
for k in range(1, args.runs + 1):
    sync()
    t0 = time.perf_counter()
    llm.generate(prompt(k * 1000), one, use_tqdm=False)
    walls.append((time.perf_counter() - t0) * 1e3)
sync()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    with record_function("phase:generate"):
        llm.generate(prompt(99000), one, use_tqdm=False)
path = args.trace or os.path.join(tempfile.mkdtemp(), "trace.json")
prof.export_chrome_trace(path)
events = json.load(open(path))["traceEvents"]
gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
              or (not torch.cuda.is_available() and e.get("cat") == "cpu_op")),  # smoke run
             key=lambda e: e["ts"])
marks = [e for e in events if e.get("cat") == "user_annotation"
         and str(e.get("name", "")).startswith("phase:")]
gen = next(e for e in marks if e["name"] == "phase:generate")
g0, g1 = gen["ts"], gen["ts"] + gen["dur"]
k0, k1 = gpu[0]["ts"], max(e["ts"] + e["dur"] for e in gpu)
busy = sum(e["dur"] for e in gpu)
gaps = []
end = gpu[0]["ts"] + gpu[0]["dur"]
for prev, e in zip(gpu, gpu[1:]):
    if e["ts"] > end:
        gaps.append((e["ts"] - end, prev["name"], e["name"]))
    end = max(end, e["ts"] + e["dur"])
print(f"{args.model}: {args.input_len}-token prompt, one token. Unprofiled wall median "
      f"{statistics.median(walls):.2f} ms ({', '.join(f'{w:.1f}' for w in walls)})")
print(f"profiled generate {gen['dur'] / 1e3:.2f} ms: before the first GPU op "
      f"{(k0 - g0) / 1e3:.2f} ms | GPU span {(k1 - k0) / 1e3:.2f} ms (busy {busy / 1e3:.2f}, "
      f"idle {sum(g[0] for g in gaps) / 1e3:.2f} in {len(gaps)} gaps) | after the last "
      f"{(g1 - k1) / 1e3:.2f} ms; {len(gpu)} GPU ops")
for dur, a, b in sorted(gaps, reverse=True)[:args.gaps]:
    print(f"  gap {dur:8.1f} us  after {a[:50]}  before {b[:50]}")
sums: dict[str, list[float]] = {}
for e in marks:
    sums.setdefault(e["name"][6:], []).append(e["dur"])
print("host phases (ms, calls; nested phases count in their parents):")
for name, durs in sorted(sums.items(), key=lambda kv: -sum(kv[1])):
    first = min(e["ts"] for e in marks if e["name"] == "phase:" + name)
    print(f"  {name:18s} {sum(durs) / 1e3:8.2f} ms  x{len(durs)}  first at "
          f"{(first - g0) / 1e3:7.2f} ms")
by_kernel: dict[str, float] = {}
for e in gpu:
    by_kernel[e["name"][:60]] = by_kernel.get(e["name"][:60], 0.0) + e["dur"]
print("GPU ops (ms):")
for name, dur in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]:
    print(f"  {dur / 1e3:8.2f}  {name}")
if args.cprofile:
    import cProfile
    import pstats
    sync()
    pr = cProfile.Profile()
    pr.enable()
    llm.generate(prompt(77000), one, use_tqdm=False)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(args.cprofile)
if args.events and torch.cuda.is_available():
    # Each mark records a CUDA event and the host clock. An event fires when the GPU reaches
    # it: with the GPU idle, at once; behind queued kernels, when they are done.
    marks_at: list[tuple[str, float, torch.cuda.Event]] = []

    def mark(name: str) -> None:
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        marks_at.append((name, time.perf_counter(), e))

    def around(name: str, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            mark(name + " start")
            out = fn(*a, **kw)
            mark(name + " end")
            return out
        return wrapper

    runner.model.forward = around("forward", runner.model.forward)
    runner.sampler = around("sampler", runner.sampler)
    rows: dict[str, list[tuple[float, float]]] = {}
    for k in range(args.events):
        marks_at.clear()
        sync()
        mark("generate start")
        llm.generate(prompt(55000 + 1000 * k), one, use_tqdm=False)
        t_end = time.perf_counter()
        sync()
        _, t0, e0 = marks_at[0]
        for name, t, e in marks_at[1:]:
            rows.setdefault(name, []).append(((t - t0) * 1e3, e0.elapsed_time(e)))
        rows.setdefault("generate returns", []).append(((t_end - t0) * 1e3, float("nan")))
    print(f"CUDA-event marks, unprofiled, median of {args.events} runs "
          "(ms from generate's start: host clock when reached, GPU when the event fired):")
    for name, vals in rows.items():
        host = statistics.median(v[0] for v in vals)
        gpu = statistics.median(v[1] for v in vals)
        print(f"  {name:18s} host {host:8.2f}   gpu {gpu:8.2f}")
