"""Where a batch-1 decode step's time goes on CUDA: the captured graph's replay time, its
kernels (per step: launches, mean and total microseconds) and the engine's whole step.

    python scripts/diag_decode.py [MODEL_DIR [TRACE_JSON [QUANTIZATION]]] [--ab] [--json F]

--ab captures the graph again under each of TANDEM_NORM_CHAIN=0/all x TANDEM_PDL=1/0 in one
process (--pdl-ab: PDL on and off only; --env-ab NAME=A,B: each value of one environment
variable, e.g. TANDEM_L2_PREFETCH=1,0) (same weights, same machine state), so the variants
compare directly. With PDL on,
a kernel starts before the one ahead of it ends and waits inside, so its measured duration
includes that wait; the PDL-off rows show each kernel's own time (and the launch gaps as
replay minus busy). --json writes every variant's numbers.

The replays run on the static inputs the variant's generate left behind: one sequence at
the end of a 128 + 257-token request, so attention reads a real context. (Before 2026-12-01
the replays came straight after the capture, which leaves a context of 1 token: Qwen3-30B-
A3B's step read 2.29 ms there against 2.49 ms at a real context.)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from tandem import LLM, SamplingParams
from tandem.bench.timing import replay_us

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("model", nargs="?", default="bench/configs/llama-3.1-8b")
ap.add_argument("trace", nargs="?", default="/tmp/decode_trace.json")
ap.add_argument("quantization", nargs="?", default=None)
ap.add_argument("--ab", action="store_true", help="norm chain off/all x PDL on/off")
ap.add_argument("--pdl-ab", action="store_true", help="PDL on, then off (chain as set)")
ap.add_argument("--env-ab", metavar="NAME=A,B,...",
                help="each value of one environment variable (PDL and chain as set)")
ap.add_argument("--rounds", type=int, default=1,
                help="--env-ab: cycle through the values this many times")
ap.add_argument("--json", help="write the numbers here")
args = ap.parse_args()

llm = LLM(args.model, load_format="dummy", max_model_len=4096, max_num_seqs=1,
          quantization=args.quantization)
llm.generate([list(range(1, 129))], SamplingParams(temperature=0.0, max_tokens=64,
                                                   ignore_eos=True), use_tqdm=False)
graphs = llm.engine.runner.graphs


def replay_ms(g: torch.cuda.CUDAGraph, reps: int = 50) -> float:
    """Best of 5 timed runs of `reps` replays, after a warm-up."""
    for _ in range(20):
        g.replay()
    return min(replay_us(g, reps) for _ in range(5)) / 1e3


def kernels_per_step(g: torch.cuda.CUDAGraph, steps: int = 20) -> list[dict]:
    """Each kernel of one replay: name, launches, mean us, total us, sorted by total."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            g.replay()
        torch.cuda.synchronize()
    acc: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if e.device_type.name == "CUDA":
            acc[e.name.split("(")[0][:60]].append(e.device_time_total)
    rows = [{"kernel": k, "per_step": len(v) / steps, "mean_us": sum(v) / len(v),
             "total_us": sum(v) / steps} for k, v in acc.items()]
    return sorted(rows, key=lambda r: -r["total_us"])


def step_ms() -> float:
    t0 = time.perf_counter()
    llm.generate([list(range(200, 328))], SamplingParams(temperature=0.0, max_tokens=257,
                                                         ignore_eos=True), use_tqdm=False)
    return (time.perf_counter() - t0) / 257 * 1e3


chain_env = os.environ.get("TANDEM_NORM_CHAIN", "quantized")
pdl_env = os.environ.get("TANDEM_PDL", "1")
extra_name, extra_values = None, [None]
if args.env_ab:
    extra_name, _, values = args.env_ab.partition("=")
    extra_values = values.split(",") * args.rounds
variants = ([(c, p, None) for c in ("0", "all") for p in ("1", "0")] if args.ab
            else [(chain_env, "1", None), (chain_env, "0", None)] if args.pdl_ab
            else [(chain_env, pdl_env, v) for v in extra_values])
results = []
for chain, pdl, extra in variants:
    os.environ["TANDEM_NORM_CHAIN"], os.environ["TANDEM_PDL"] = chain, pdl
    if extra is not None:
        os.environ[extra_name] = extra
    graphs.capture()  # again, under this variant's switches
    g = graphs.graphs[1]
    generate = step_ms()  # also leaves the static inputs at a real context (docstring)
    rows = kernels_per_step(g)
    res = {"norm_chain": chain, "pdl": pdl, extra_name or "extra": extra,
           "graph_replay_ms": replay_ms(g),
           "kernels_per_step": sum(r["per_step"] for r in rows),
           "busy_ms": sum(r["total_us"] for r in rows) / 1e3,
           "generate_ms_per_token": generate, "kernels": rows}
    results.append(res)
    print(f"\n== TANDEM_NORM_CHAIN={chain} TANDEM_PDL={pdl}"
          f"{f' {extra_name}={extra}' if extra is not None else ''}: graph replay "
          f"{res['graph_replay_ms']:.3f} ms, {res['kernels_per_step']:.0f} kernels, busy "
          f"{res['busy_ms']:.3f} ms; generate 128 in / 257 out "
          f"{res['generate_ms_per_token']:.3f} ms per token")
    print(f"  {'kernel':<44}{'per step':>9}{'mean us':>9}{'us/step':>9}")
    for r in rows:
        print(f"  {r['kernel']:<44}{r['per_step']:>9.1f}{r['mean_us']:>9.2f}{r['total_us']:>9.1f}")

if args.json:
    with open(args.json, "w") as f:
        json.dump({"model": args.model, "quantization": args.quantization,
                   "device": torch.cuda.get_device_name(), "variants": results}, f, indent=1)

# the engine's own steps (graph + LM head + sampling + host), for scripts/diag_trace.py
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    llm.generate([list(range(400, 528))], SamplingParams(temperature=0.0, max_tokens=33,
                                                         ignore_eos=True), use_tqdm=False)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
prof.export_chrome_trace(args.trace)
