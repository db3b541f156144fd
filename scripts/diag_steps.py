"""Is batch-1 decode bound by the GPU or by the host between steps? Runs one request (128 in,
256 out, greedy) with timers on the engine's step loop, no profiler:

    schedule, launch, finish   host time of each part of a step (launch: inputs, the graph
                               replay call, the LM head and sampler launches, the copy out)
    wait                       host time blocked in collect (the step's one sync): ~0 means
                               the GPU was waiting for the host instead
    gpu                        CUDA-event time from the start of a step's first launch on
                               the stream to its copy-out, with no host gap inside when the
                               launch was enqueued while the GPU was still busy

and, for comparison, the batch-1 graph alone (best of 5 x 50 replays).

    python scripts/diag_steps.py [MODEL_DIR] [--output-len 256] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tandem import LLM, SamplingParams
from tandem.bench.timing import replay_us

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("model", nargs="?", default="bench/configs/qwen3-30b-a3b")
ap.add_argument("--output-len", type=int, default=256)
ap.add_argument("--json")
args = ap.parse_args()

llm = LLM(args.model, load_format="dummy", max_model_len=1024, max_num_seqs=1)
engine = llm.engine
params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
llm.generate([list(range(1, 129))], params, use_tqdm=False)  # warm-up

times: dict[str, list[float]] = {k: [] for k in ("schedule", "launch", "wait", "finish")}
spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
executor, scheduler = engine.executor, engine.scheduler


def timed(name, fn):
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        times[name].append(time.perf_counter() - t0)
        return out
    return wrapper


launch, collect = executor.launch, executor.collect


def launch_with_events(plan):
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    launched = launch(plan)
    times["launch"].append(time.perf_counter() - t0)
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    spans.append((start, end))
    return launched


executor.launch = launch_with_events
executor.collect = timed("wait", collect)
scheduler.schedule = timed("schedule", scheduler.schedule)
engine._finish_step = timed("finish", engine._finish_step)

torch.cuda.synchronize()
t0 = time.perf_counter()
llm.generate([list(range(200, 328))], params, use_tqdm=False)
wall = time.perf_counter() - t0
torch.cuda.synchronize()
gpu = [s.elapsed_time(e) / 1e3 for s, e in spans]
graph = engine.executor.runner.graphs.graphs[1] if hasattr(engine.executor, "runner") else None
replay = min(replay_us(graph, 50) for _ in range(5)) / 1e3 if graph is not None else None
decode = slice(2, None)  # past the prefill step and the first decode
res = {"model": args.model, "device": torch.cuda.get_device_name(), "wall_s": wall,
       "steps": len(spans), "ms_per_step_wall": wall / len(spans) * 1e3,
       "graph_replay_ms": replay,
       **{f"{k}_ms_median": statistics.median(v[decode]) * 1e3 for k, v in times.items()},
       **{f"{k}_ms_mean": statistics.fmean(v[decode]) * 1e3 for k, v in times.items()},
       "gpu_ms_median": statistics.median(gpu[decode]) * 1e3,
       "gpu_ms_mean": statistics.fmean(gpu[decode]) * 1e3}
for k, v in res.items():
    print(f"{k:<22} {v:.4f}" if isinstance(v, float) else f"{k:<22} {v}")
print(json.dumps(res))
if args.json:
    with open(args.json, "w") as f:
        json.dump(res, f)
