"""Is a short prefill (TTFT) bound by the GPU or by the host? Runs one prompt for one token
several times: the median wall time, then one run under the profiler: GPU busy time (the sum
of kernel and copy durations), launches, the host ops that took the most CPU time, and the
kernels that took the most GPU time (what a long prompt's TTFT is made of).

    python scripts/diag_prefill.py [MODEL_DIR] [--input-len 128] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tandem import LLM, SamplingParams

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("model", nargs="?", default="bench/configs/qwen3-30b-a3b")
ap.add_argument("--input-len", type=int, default=128)
ap.add_argument("--runs", type=int, default=5)
ap.add_argument("--kernels", type=int, default=25, help="rows of the GPU kernel table")
args = ap.parse_args()

llm = LLM(args.model, load_format="dummy", max_model_len=max(1024, args.input_len + 64),
          max_num_seqs=1, max_num_batched_tokens=max(8192, args.input_len))
one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
prompt = lambda k: [list(range(100 + k, 100 + k + args.input_len))]  # noqa: E731 (fresh)
llm.generate(prompt(0), one, use_tqdm=False)  # warm-up: compiles the prefill shapes
walls = []
for k in range(1, args.runs + 1):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate(prompt(k * 1000), one, use_tqdm=False)
    walls.append((time.perf_counter() - t0) * 1e3)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    t0 = time.perf_counter()
    llm.generate(prompt(99000), one, use_tqdm=False)
    profiled = (time.perf_counter() - t0) * 1e3
gpu = [e for e in prof.events() if e.device_type.name == "CUDA"]
busy = sum(e.device_time_total for e in gpu) / 1e3
print(f"{args.model}: {args.input_len}-token prompt, one token: wall median "
      f"{statistics.median(walls):.2f} ms (runs {', '.join(f'{w:.1f}' for w in walls)}); "
      f"profiled run {profiled:.1f} ms with {len(gpu)} GPU events, GPU busy {busy:.2f} ms")
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                max_name_column_width=60))
print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.kernels,
                                max_name_column_width=60))
