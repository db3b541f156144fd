"""`tandem bench serve`: the command around serve.py. It builds the dataset, starts a tandem
server when no --base-url is given (and stops it afterwards), scrapes the server's prefix
cache and preemption counters around the run when it is tandem, and prints the table then
one JSON line (the benchmark contract); --save-result keeps the per-request records.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from tqdm import tqdm

from tandem.bench import datasets
from tandem.bench.progress import add_progress_flag, show_progress
from tandem.bench.serve import (arrival_gaps, parse_goodput, record_dicts, run_load,
                                summarize, table)


def add_serve_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None,
                   help="an OpenAI-compatible server (default: start `tandem serve --model`)")
    p.add_argument("--model", default=None, help="model directory: the server to start, and "
                   "the tokenizer (default: the embedded model)")
    p.add_argument("--served-model-name", default=None,
                   help="the `model` field to send (default: none)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    p.add_argument("--serve-args", default="", help="extra `tandem serve` flags, one string")
    p.add_argument("--device-label", default=None,
                   help="the device to report for a --base-url server")
    p.add_argument("--dataset", choices=datasets.DATASETS, default="random")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of load instead of a fixed count (the dataset repeats)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s (default: inf, all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps: 1 Poisson, < 1 burstier")
    p.add_argument("--constant-rate", action="store_true", help="fixed gaps of 1/rate")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--random-input-len", type=int, default=512)
    p.add_argument("--random-output-len", type=int, default=256)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len x (1 - r), len x (1 + r)]")
    p.add_argument("--mix", default="0.8:256,0.2:8192",
                   help="mixed: SHARE:INPUT_LEN,... (outputs: --random-output-len)")
    p.add_argument("--num-groups", type=int, default=8, help="shared-prefix: groups")
    p.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: prefix tokens")
    p.add_argument("--suffix-len", type=int, default=64, help="shared-prefix: unique tokens")
    p.add_argument("--code-dir", default=None,
                   help="code: Python files to cut requests from (default: tandem's source)")
    p.add_argument("--fim-ratio", type=float, default=0.3, help="code: share of FIM requests")
    p.add_argument("--dataset-path", default=None, help="sharegpt JSON or jsonl file")
    p.add_argument("--ignore-eos", action="store_true", help="generate max_tokens exactly")
    p.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                   help="latency bounds (ttft:MS tpot:MS e2el:MS) for goodput")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    p.add_argument("--save-result", default=None, help="JSON file: summary + every request")
    add_progress_flag(p)
    p.set_defaults(func=run_serve_bench)


def build_specs(args: argparse.Namespace, tok) -> list[datasets.RequestSpec]:
    n, seed, model, eos = args.num_prompts, args.seed, args.served_model_name, args.ignore_eos
    if args.dataset == "random":
        return datasets.random_dataset(tok, n, args.random_input_len, args.random_output_len,
                                       args.random_range_ratio, seed, model, eos)
    if args.dataset == "mixed":
        return datasets.mixed_dataset(tok, n, datasets.parse_mix(args.mix),
                                      args.random_output_len, seed, model, eos)
    if args.dataset == "shared-prefix":
        return datasets.shared_prefix_dataset(tok, n, args.num_groups, args.prefix_len,
                                              args.suffix_len, args.random_output_len, seed,
                                              model, eos)
    if args.dataset == "code":
        code_dir = args.code_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return datasets.code_dataset(tok, n, code_dir, args.random_input_len,
                                     args.random_output_len, args.fim_ratio, seed, model, eos)
    if not args.dataset_path:
        raise ValueError(f"--dataset {args.dataset} needs --dataset-path")
    if args.dataset == "sharegpt":
        return datasets.sharegpt_dataset(tok, n, args.dataset_path, args.random_output_len,
                                         seed, model, eos)
    return datasets.jsonl_dataset(n, args.dataset_path, model, eos)


def start_server(model_dir: str | None, serve_args: str, log_path: str,
                 timeout_s: float = 900.0) -> tuple[subprocess.Popen, str]:
    """`tandem serve` on a free loopback port; returns once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "tandem", "serve", *([model_dir] if model_dir else []),
           "--port", str(port), "--uvicorn-log-level", "warning", *shlex.split(serve_args)]
    # (bound to port 0 and released: another process could take it in between, which
    # then shows as this server failing to start)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"tandem serve exited with {proc.returncode}:\n"
                                   f"{f.read()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                if _get(url + "/health")[0] == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"tandem serve did not come up in {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except (urllib.error.URLError, OSError):
        return 0, ""


def parse_metrics(text: str) -> dict[str, float]:
    """tandem's series from a /metrics page, by name (labels dropped; the first wins)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("tandem:"):
            series, _, value = line.rpartition(" ")
            out.setdefault(series.split("{")[0], float(value))
    return out


def server_counters(url: str) -> dict[str, float] | None:
    """tandem's cumulative prefix-cache and preemption counters (None: not tandem)."""
    status, text = _get(url + "/metrics")
    metrics = parse_metrics(text) if status == 200 else {}
    wanted = ("tandem:prefix_cache_queries_total", "tandem:prefix_cache_hits_total",
              "tandem:num_preemptions_total")
    out = {k.removeprefix("tandem:"): metrics[k] for k in wanted if k in metrics}
    return out or None


def device_label(args: argparse.Namespace, started: bool) -> str:
    if args.device_label:
        return args.device_label
    if not started:
        return "remote"
    import torch

    from tandem.bench.cli import device_name
    return device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def measure(args: argparse.Namespace, url: str) -> tuple[dict[str, Any], list]:
    """One run against `url`: the summary (with server counters) and the records."""
    from tandem.assets import default_model_dir
    from tandem.engine.tokenizer import Tokenizer
    tok = Tokenizer(args.tokenizer or args.model or default_model_dir())
    specs = build_specs(args, tok)
    if args.duration:  # repeat the set until the time is up (gaps drawn for all of them)
        specs = specs * max(1, int(args.duration * min(args.request_rate, 1e4)
                                   // len(specs) + 1))
    gaps = arrival_gaps(len(specs), args.request_rate, args.burstiness, args.constant_rate,
                        args.seed)
    before = server_counters(url)
    bar = tqdm(total=len(specs), desc="requests", unit="req", file=sys.stderr,
               disable=not show_progress(args.no_progress))
    records, elapsed = asyncio.run(run_load(url, specs, gaps, args.max_concurrency,
                                            args.timeout, lambda _: bar.update(1),
                                            deadline_s=args.duration))
    bar.close()
    summary = summarize(records, elapsed, parse_goodput(args.goodput))
    after = server_counters(url)
    if before and after:
        queries = after["prefix_cache_queries_total"] - before["prefix_cache_queries_total"]
        hits = after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"]
        summary["server"] = {"prefix_cache_hit_rate": hits / queries if queries else 0.0,
                             "preemptions": after["num_preemptions_total"]
                             - before["num_preemptions_total"]}
    return summary, records


def run_serve_bench(args: argparse.Namespace) -> int:
    from tandem.bench.cli import git_commit
    parse_goodput(args.goodput)  # a bad bound fails before any server starts
    proc = None
    url = args.base_url
    if url is None:
        log = args.save_result + ".server.log" if args.save_result else os.devnull
        proc, url = start_server(args.model, args.serve_args, log)
    try:
        summary, records = measure(args, url.rstrip("/"))
    finally:
        if proc is not None:
            stop_server(proc)
    record = {
        "benchmark": "serve", "device": device_label(args, proc is not None),
        "target": args.base_url or "tandem serve (started)",
        "model": args.model or "default",
        "workload": {k: getattr(args, k) for k in (
            "dataset", "num_prompts", "duration", "request_rate", "burstiness",
            "constant_rate", "max_concurrency", "random_input_len", "random_output_len",
            "random_range_ratio", "ignore_eos", "seed")},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["tandem"] + sys.argv[1:]), "git_commit": git_commit(),
        **summary}
    if math.isinf(args.request_rate):  # JSON has no infinity
        record["workload"]["request_rate"] = "inf"
    rows = table(summary)
    if "server" in summary:
        rows += [("prefix cache hit rate (server)", summary["server"]["prefix_cache_hit_rate"]),
                 ("preemptions (server)", summary["server"]["preemptions"])]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.save_result:
        with open(args.save_result, "w") as f:
            json.dump({**record, "requests": record_dicts(records)}, f)
    print(json.dumps(record))
    return 0 if summary["completed"] else 1

