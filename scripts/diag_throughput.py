"""Host phases of the engine loop under an offline throughput load on CUDA: where each
step's wall time goes, and how long `collect` waits for the device (the device-bound
share). Usage: python scripts/diag_throughput.py [MODEL_DIR] [NUM_PROMPTS]"""

from __future__ import annotations

import collections
import random
import sys
import time

import torch

from tandem import LLM, SamplingParams

model = sys.argv[1] if len(sys.argv) > 1 else "bench/configs/llama-3.1-8b"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 512
llm = LLM(model, load_format="dummy", max_model_len=1024, max_num_seqs=512)
eng = llm.engine
rng = random.Random(0)
params = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
llm.generate([[rng.randrange(1000, 100000) for _ in range(512)] for _ in range(16)],
             SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)

totals: dict[str, float] = collections.defaultdict(float)


def timed(obj, name, key):
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            totals[key] += time.perf_counter() - t
    setattr(obj, name, wrapper)


timed(eng.scheduler, "schedule", "schedule")
timed(eng.runner, "launch", "launch")
timed(eng.runner, "_to_result", "to_result")
import tandem.runner.model_runner as mr  # noqa: E402

for mod, name in [(mr, "build_model_inputs"), (mr, "build_sampling_tensors"), (mr, "_to_host")]:
    timed(mod, name, "  " + name)
timed(eng.runner.model, "forward", "  forward(eager)")
timed(eng.runner.model, "compute_logits", "  compute_logits")
timed(eng.runner.sampler, "__call__", "  sampler")
if eng.runner.graphs is not None:
    timed(eng.runner.graphs, "run", "  graph run")
timed(eng.scheduler, "update", "update")
timed(eng.outputs, "process", "process")
orig_collect = eng.runner.collect


def collect(launched):
    t = time.perf_counter()
    if launched.event is not None:
        launched.event.synchronize()
    totals["wait"] += time.perf_counter() - t
    return orig_collect(launched)


eng.runner.collect = collect
steps = 0
orig_step = eng.step


kinds = collections.Counter()


def step():
    global steps
    steps += 1
    t = time.perf_counter()
    out = orig_step()
    plan = eng._inflight[0] if eng._inflight is not None else None
    kind = "empty" if plan is None or plan.is_empty else (
        "decode" if plan.num_batched_tokens == len(plan.seqs) else "mixed")
    kinds[kind] += 1
    totals["step:" + kind] += time.perf_counter() - t
    return out


eng.step = step
prompts = [[rng.randrange(1000, 100000) for _ in range(512)] for _ in range(n)]
t0 = time.perf_counter()
llm.generate(prompts, params, use_tqdm=False)
wall = time.perf_counter() - t0
print(f"{n} prompts x 512 in / 256 out: {wall:.2f} s, {n * 256 / wall:.0f} output tok/s, "
      f"{steps} steps, {wall / steps * 1e3:.2f} ms per step")
print("step kinds", dict(kinds))
for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
    print(f"  {k:10s} {v:7.2f} s  {v / steps * 1e3:7.2f} ms/step")

# Kernels of a few steady-state decode steps.
for i, p in enumerate(prompts[:512]):
    eng.add_request(f"d{i}", p[:500], SamplingParams(temperature=0.0, max_tokens=64,
                                                     ignore_eos=True))
while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running) \
        or eng.scheduler.waiting:
    eng.step()
for _ in range(3):
    eng.step()
from torch.profiler import ProfilerActivity, profile  # noqa: E402

torch.cuda.synchronize()
t = time.perf_counter()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(10):
        eng.step()
    torch.cuda.synchronize()
print(f"10 decode steps at batch {len(eng.scheduler.running)}: "
      f"{(time.perf_counter() - t) * 100:.2f} ms per step (profiled)")
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
while eng.has_unfinished_requests():
    eng.step()
