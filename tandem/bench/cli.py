"""`tandem bench latency|prefill|throughput`: offline benchmarks with a contract.

Each prints a human table, then ONE JSON object as the last stdout line: the device, the
workload, the measured numbers, the hardware bound (`roofline_s`, see roofline.py) and
`roofline_fraction = roofline_s / elapsed_s`. While it runs, a progress bar on stderr
(progress.py) counts latency/prefill runs, warm-up included, or throughput's finished requests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import subprocess
import sys
import time
from typing import Any

import torch
from tqdm import tqdm

from tandem import envs
from tandem.bench.progress import add_progress_flag, show_progress
from tandem.bench.roofline import ModelShape, Workload, measure, roofline_seconds


def git_commit() -> str:
    if envs.git_commit():  # set where the tree is a copy without .git
        return envs.git_commit()
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:  # not a checkout
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _random_prompts(n: int, lens: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(lens[i])] for i in range(n)]


def _make_llm(args: argparse.Namespace):
    from tandem import spec_decode
    from tandem.assets import default_model_dir
    from tandem.cli import engine_kwargs
    from tandem.engine.llm import LLM
    spec_decode.SYNTHETIC_ALLOWED = True  # benchmarks only: see SpeculativeConfig
    return LLM(args.model or default_model_dir(), **engine_kwargs(args))


def _spec_record(llm) -> dict[str, Any]:
    """Speculative decoding's config, counters and profiled step costs (empty when off)."""
    spec = llm.engine.config.scheduler.speculative_config
    if spec is None:
        return {"speculative": None}
    import dataclasses
    st = llm.engine.stats()
    return {"speculative": dataclasses.asdict(spec),
            # synthetic: drafts accepted at random, NOT checked against the model
            "spec_synthetic": spec.synthetic_acceptance_rate is not None,
            "spec_drafted": st.spec_drafted_total, "spec_accepted": st.spec_accepted_total,
            "spec_acceptance_rate": st.spec_acceptance_rate,
            "spec_mean_accepted_length": st.spec_mean_accepted_length,
            "spec_accepted_per_position": list(st.spec_accepted_per_position),
            "spec_step_costs_s": llm.engine.executor.spec_costs}


def _report(rows: list[tuple[str, Any]], record: dict[str, Any], llm=None) -> None:
    if llm is not None:
        record |= _spec_record(llm)
    if record.get("speculative"):
        rows = rows + [("spec acceptance rate", record["spec_acceptance_rate"]),
                       ("spec mean accepted length", record["spec_mean_accepted_length"])]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    print(json.dumps(record))


def _base_record(name: str, args: argparse.Namespace, llm) -> dict[str, Any]:
    executor = llm.engine.executor
    tp = llm.engine.config.parallel.tensor_parallel_size
    return {"benchmark": name, "device": device_name(executor.device) + (f" x{tp}" if tp > 1
                                                                         else ""),
            "tensor_parallel_size": tp, "quantization": llm.engine.config.model.quantization,
            "kv_cache_dtype": llm.engine.config.cache.kv_cache_dtype,
            "kv_cache_tokens": executor.num_blocks * llm.engine.config.cache.block_size,
            "model": args.model or "default", "dtype": str(executor.dtype).replace("torch.", ""),
            "load_format": args.load_format or "auto",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["tandem"] + sys.argv[1:]), "git_commit": git_commit()}


def _shape_and_rates(llm) -> tuple[ModelShape, float, float, dict[str, Any]]:
    """(shape, matmul FLOP/s, bytes/s, the rates' record for the JSON: how and what was
    measured, per rank). Measured after the benchmark's runs, warm (roofline.measure)."""
    from tandem.models.loader import read_hf_config
    executor = llm.engine.executor
    from tandem.quantization import QuantPolicy
    quant = QuantPolicy.parse(llm.engine.config.model.quantization)
    shape = ModelShape.from_hf(read_hf_config(llm.engine.config.model.model), executor.dtype,
                               quant)
    rates = measure(executor.device, executor.dtype)
    # Tensor parallelism: the bound is every rank's matmul and bandwidth together (the
    # all-reduces' cost is what the achieved fraction then shows).
    tp = llm.engine.config.parallel.tensor_parallel_size
    return (shape, rates.matmul_flops_per_s * tp, rates.mem_bytes_per_s * tp,
            {"rates": rates.record() | {"ranks": tp}})


def _runs_bar(args: argparse.Namespace, desc: str) -> tqdm:
    """A bar over the warm-up and measured runs; it updates between runs, outside the timing."""
    return tqdm(total=args.warmup + args.iters, desc=desc, unit="run", file=sys.stderr,
                disable=not show_progress(args.no_progress))


def _max_batch(llm, total_len: int) -> int:
    e = llm.engine
    blocks_per_req = -(-total_len // e.config.cache.block_size)
    return max(1, min(e.config.scheduler.max_num_seqs, e.executor.num_blocks // blocks_per_req))


def run_latency(args: argparse.Namespace) -> int:
    from tandem.request import SamplingParams
    llm = _make_llm(args)
    vocab = llm.engine.vocab_size
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    full = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    lens = [args.input_len] * args.batch_size
    # Every run gets fresh prompts, so no run is served by an earlier one's prefix cache.
    fresh = iter(_random_prompts(args.batch_size, lens, vocab, (args.seed or 0) + k)
                 for k in range(1, 10**6))
    bar = _runs_bar(args, "latency")
    for _ in range(args.warmup):
        llm.generate(next(fresh), full, use_tqdm=False)
        bar.update()
    ttfts, totals = [], []
    for _ in range(args.iters):
        prompts = next(fresh)
        t0 = time.perf_counter()
        llm.generate(prompts, first, use_tqdm=False)
        ttfts.append(time.perf_counter() - t0)
        prompts = next(fresh)
        t0 = time.perf_counter()
        llm.generate(prompts, full, use_tqdm=False)
        totals.append(time.perf_counter() - t0)
        bar.update()
    bar.close()
    ttft, total = sorted(ttfts)[len(ttfts) // 2], sorted(totals)[len(totals) // 2]
    tpot = (total - ttft) / max(1, args.output_len - 1)
    shape, flops, bw, rates = _shape_and_rates(llm)
    work = Workload([(args.input_len, args.output_len)] * args.batch_size, args.batch_size)
    roof, roof_c, roof_m = roofline_seconds(shape, work, flops, bw)
    record = _base_record("latency", args, llm) | {
        "batch_size": args.batch_size, "input_len": args.input_len,
        "output_len": args.output_len, "ttft_ms": ttft * 1e3, "ms_per_output_token": tpot * 1e3,
        "output_tokens_per_s": args.batch_size * args.output_len / total, "elapsed_s": total,
        "matmul_flops_per_s": flops, "mem_bytes_per_s": bw, "roofline_s": roof,
        "roofline_compute_s": roof_c, "roofline_memory_s": roof_m,
        "roofline_fraction": roof / total} | rates
    _report([("TTFT (ms)", ttft * 1e3), ("ms per output token", tpot * 1e3),
             ("end-to-end (s)", total), ("roofline (s)", roof),
             ("roofline fraction", roof / total)], record, llm)
    return 0


def run_prefill(args: argparse.Namespace) -> int:
    """One long prompt, one output token: TTFT against the matmul-rate bound."""
    from tandem.bench.roofline import workload_flops
    from tandem.request import SamplingParams
    llm = _make_llm(args)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    # A fresh prompt each run: a repeated one would be served by the prefix cache.
    prompts = [_random_prompts(1, [args.input_len], llm.engine.vocab_size, (args.seed or 0) + k)
               for k in range(args.warmup + args.iters)]
    bar = _runs_bar(args, "prefill")
    for prompt in prompts[:args.warmup]:
        llm.generate(prompt, params, use_tqdm=False)
        bar.update()
    times = []
    for prompt in prompts[args.warmup:]:
        t0 = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        bar.update()
    bar.close()
    elapsed = sorted(times)[len(times) // 2]
    shape, flops_rate, bw, rates = _shape_and_rates(llm)
    work = Workload([(args.input_len, 1)], 1)
    flops = workload_flops(shape, work)
    roof, roof_c, roof_m = roofline_seconds(shape, work, flops_rate, bw)
    record = _base_record("prefill", args, llm) | {
        "batch_size": 1, "input_len": args.input_len, "output_len": 1,
        "ttft_ms": elapsed * 1e3, "elapsed_s": elapsed, "flops": flops,
        "achieved_flops_per_s": flops / elapsed, "matmul_flops_per_s": flops_rate,
        "mem_bytes_per_s": bw, "roofline_s": roof, "roofline_compute_s": roof_c,
        "roofline_memory_s": roof_m, "roofline_fraction": roof / elapsed} | rates
    _report([("prompt tokens", args.input_len), ("TTFT (ms)", elapsed * 1e3),
             ("achieved TFLOP/s", flops / elapsed / 1e12),
             ("matmul TFLOP/s", flops_rate / 1e12), ("roofline fraction", roof / elapsed)],
            record)
    return 0


def _throughput_workload(args: argparse.Namespace, vocab: int
                         ) -> tuple[list[list[int]], list[int], list[int]]:
    """(prompts, prompt lengths, output lengths): fixed, or uniform in the given ranges."""
    rng = random.Random(args.seed or 0)
    n = args.num_prompts
    if args.input_len_range:
        lo, hi = args.input_len_range
        in_lens = [rng.randint(lo, hi) for _ in range(n)]
        lo, hi = args.output_len_range or (args.output_len, args.output_len)
        out_lens = [rng.randint(lo, hi) for _ in range(n)]
    else:
        in_lens, out_lens = [args.input_len] * n, [args.output_len] * n
    return _random_prompts(n, in_lens, vocab, args.seed or 0), in_lens, out_lens


def measure_tandem_throughput(llm, prompts: list[list[int]], out_lens: list[int],
                              warmup: bool = True, progress: bool = False
                              ) -> tuple[float, int]:
    """(elapsed seconds, output tokens) of one offline batch through the engine; `progress`
    shows the engine's bar of finished requests for the measured batch."""
    from tandem.request import SamplingParams
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in out_lens]
    if warmup:
        # Other prompts (the measured ones must not be in the prefix cache), enough of them
        # to overflow one step's token budget, so the warm-up also runs steps that mix
        # decodes with prefill chunks (their kernels compile here, not in the measurement).
        budget = llm.engine.config.scheduler.max_num_batched_tokens
        count, total = 0, 0
        while count < len(prompts) and (count < 8 or total <= 2 * budget):
            total += len(prompts[count])
            count += 1
        lens = [len(p) for p in prompts[:count]]
        short = [SamplingParams(temperature=0.0, max_tokens=min(o, 8), ignore_eos=True)
                 for o in out_lens[:count]]
        llm.generate(_random_prompts(count, lens, llm.engine.vocab_size, 12345), short,
                     use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=progress)
    elapsed = time.perf_counter() - t0
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def _measure_peer(args: argparse.Namespace, model_dir: str, device: torch.device,
                  dtype: torch.dtype, prompts: list[list[int]], out_lens: list[int]
                  ) -> dict[str, Any]:
    from tandem.bench import peer
    attn = "paged|sdpa" if args.backend == "transformers" else None
    model = peer.load_hf_model(model_dir, device, dtype, attn, dummy=args.load_format == "dummy")
    k = min(len(prompts), args.peer_num_prompts or len(prompts))
    run = peer.run_hf_generate if args.backend == "hf-generate" else peer.run_hf_generate_batch
    elapsed, tokens = run(model, prompts[:k], out_lens[:k])
    return {"name": f"transformers {args.backend}", "num_prompts": k, "elapsed_s": elapsed,
            "output_tokens_per_s": tokens / elapsed}


def _free(llm) -> None:
    """Release the engine's device memory (KV pool, CUDA graphs) before a peer runs."""
    import gc
    if llm.engine.runner is not None:
        llm.engine.runner.graphs = None
    llm.engine.shutdown()
    llm.engine = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_throughput(args: argparse.Namespace) -> int:
    llm = _make_llm(args)
    prompts, in_lens, out_lens = _throughput_workload(args, llm.engine.vocab_size)
    n = len(prompts)
    elapsed, out_tokens = measure_tandem_throughput(llm, prompts, out_lens, args.warmup,
                                                    show_progress(args.no_progress))
    in_tokens = sum(in_lens)
    shape, flops, bw, rates = _shape_and_rates(llm)
    work = Workload(list(zip(in_lens, out_lens)),
                    _max_batch(llm, max(i + o for i, o in zip(in_lens, out_lens))))
    roof, roof_c, roof_m = roofline_seconds(shape, work, flops, bw)
    record = _base_record("throughput", args, llm) | {
        "num_prompts": n, "input_len": args.input_len_range or args.input_len,
        "output_len": args.output_len_range or args.output_len,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + in_tokens) / elapsed, "elapsed_s": elapsed,
        "matmul_flops_per_s": flops, "mem_bytes_per_s": bw, "roofline_s": roof,
        "roofline_compute_s": roof_c, "roofline_memory_s": roof_m,
        "roofline_fraction": roof / elapsed} | rates | _spec_record(llm)
    rows = [("prompts", n), ("output tokens/s", out_tokens / elapsed),
            ("total tokens/s", (out_tokens + in_tokens) / elapsed), ("elapsed (s)", elapsed),
            ("roofline (s)", roof), ("roofline fraction", roof / elapsed)]
    if args.backend != "tandem":
        executor = llm.engine.executor
        model_dir, device, dtype = llm.engine.config.model.model, executor.device, executor.dtype
        del executor
        _free(llm)
        try:
            peer_rec = _measure_peer(args, model_dir, device, dtype, prompts, out_lens)
        except Exception as e:  # report the peer's failure; tandem's numbers still stand
            record["peer"] = {"name": f"transformers {args.backend}", "error": repr(e)[:500]}
            _report(rows + [("peer", f"failed: {e!r}"[:200])], record)
            return 1
        record |= {"peer": peer_rec,
                   "peer_speedup": record["output_tokens_per_s"] / peer_rec["output_tokens_per_s"]}
        rows += [(f"{peer_rec['name']} output tokens/s", peer_rec["output_tokens_per_s"]),
                 ("speedup over peer", record["peer_speedup"])]
    _report(rows, record)
    return 0


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from tandem.cli import add_engine_args
    bench = sub.add_parser("bench", help="benchmarks (table + one JSON line)")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    from tandem.bench.serve_cli import add_serve_bench_args
    add_serve_bench_args(kinds.add_parser(
        "serve", help="load an OpenAI-compatible server: TTFT, TPOT, ITL, goodput"))
    from tandem.bench.sweep import add_plot_args, add_sweep_args
    add_sweep_args(kinds.add_parser("sweep", help="bench serve over concurrencies or rates, "
                                                  "for one or more configs, with plots"))
    add_plot_args(kinds.add_parser("plot", help="redraw sweep plots from saved points"))
    for name, fn in (("latency", run_latency), ("throughput", run_throughput),
                     ("prefill", run_prefill)):
        p = kinds.add_parser(name)
        p.add_argument("--model", default=None, help="model directory (default: embedded)")
        p.add_argument("--input-len", type=int, default=128)
        p.add_argument("--output-len", type=int, default=128)
        if name in ("latency", "prefill"):
            if name == "latency":
                p.add_argument("--batch-size", type=int, default=1)
            p.add_argument("--iters", type=int, default=3)
            p.add_argument("--warmup", type=int, default=1)
        else:
            p.add_argument("--num-prompts", type=int, default=100)
            p.add_argument("--input-len-range", type=int, nargs=2, metavar=("MIN", "MAX"),
                           help="mixed workload: uniform prompt lengths in [MIN, MAX]")
            p.add_argument("--output-len-range", type=int, nargs=2, metavar=("MIN", "MAX"))
            p.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True)
            p.add_argument("--backend", choices=("tandem", "hf-generate", "transformers"),
                           default="tandem", help="also measure a transformers peer: "
                           "hf-generate (one padded generate call) or transformers "
                           "(generate_batch, continuous batching)")
            p.add_argument("--peer-num-prompts", type=int, default=None,
                           help="run the peer on this many of the prompts (tokens/s compared)")
        add_progress_flag(p)
        add_engine_args(p)
        p.set_defaults(func=fn)
