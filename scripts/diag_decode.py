"""Where a batch-1 decode step's time goes on CUDA: graph replay alone vs the engine's step,
and the kernels of a few steps. Usage: python scripts/diag_decode.py [MODEL_DIR [TRACE_JSON
[QUANTIZATION]]]"""

from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tandem import LLM, SamplingParams

model = sys.argv[1] if len(sys.argv) > 1 else "bench/configs/llama-3.1-8b"
quantization = sys.argv[3] if len(sys.argv) > 3 else None
llm = LLM(model, load_format="dummy", max_model_len=4096, max_num_seqs=1,
          quantization=quantization)
params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
llm.generate([list(range(1, 129))], params, use_tqdm=False)

graphs = llm.engine.runner.graphs
g = graphs.graphs[1]
for _ in range(5):
    g.replay()
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
for _ in range(50):
    g.replay()
end.record()
torch.cuda.synchronize()
print(f"graph replay batch 1: {start.elapsed_time(end) / 50:.3f} ms")

t0 = time.perf_counter()
llm.generate([list(range(200, 328))], SamplingParams(temperature=0.0, max_tokens=257,
                                                     ignore_eos=True), use_tqdm=False)
total = time.perf_counter() - t0
print(f"generate 128 in / 257 out: {total * 1e3:.1f} ms, {total / 257 * 1e3:.3f} ms per token")

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    llm.generate([list(range(400, 528))], SamplingParams(temperature=0.0, max_tokens=33,
                                                         ignore_eos=True), use_tqdm=False)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
prof.export_chrome_trace(sys.argv[2] if len(sys.argv) > 2 else "/tmp/decode_trace.json")
