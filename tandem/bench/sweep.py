"""`tandem bench sweep` and `tandem bench plot`.

A sweep runs `bench serve` (same flags) once per point of --concurrencies or --request-rates,
for one server (--base-url) or for each --config NAME="SERVE FLAGS" (each started, swept,
stopped in turn: e.g. prefix caching on and off). Every point is saved as
OUT/CONFIG_POINT.json (summary + per-request records), then plot.py draws the pictures.
`tandem bench plot RESULT.json...` redraws them from saved points.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import sys

from tandem.bench.plot import draw
from tandem.bench.serve import load_result, record_dicts
from tandem.bench.serve_cli import (add_serve_bench_args, device_label, measure, start_server,
                                   stop_server)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _values(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    add_serve_bench_args(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--concurrencies", type=_values, help="e.g. 1,4,16,64,256")
    group.add_argument("--request-rates", type=_values, help="e.g. 1,2,4,inf")
    p.add_argument("--config", action="append", default=[], metavar='NAME="SERVE FLAGS"',
                   help="a server configuration to start and sweep (repeatable); default: "
                        "one, from --serve-args")
    p.add_argument("--out", required=True, help="directory for the points and the plots")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs per server (per-GPU axis)")
    p.add_argument("--min-rounds", type=int, default=2,
                   help="with --concurrencies: at least this many prompts per slot, so every "
                        "point reaches its steady state (default: 2)")
    p.set_defaults(func=run_sweep)


def _point_args(args: argparse.Namespace, value: float) -> tuple[argparse.Namespace, str]:
    a = copy.copy(args)
    if args.concurrencies:
        a.max_concurrency = int(value)
        a.num_prompts = max(args.num_prompts, args.min_rounds * int(value))
        return a, f"c{int(value)}"
    a.request_rate = value
    return a, "rinf" if math.isinf(value) else f"r{value:g}"


def run_sweep(args: argparse.Namespace) -> int:
    os.makedirs(args.out, exist_ok=True)
    configs = [c.partition("=")[::2] for c in args.config] or [("default", args.serve_args)]
    from tandem.bench.cli import git_commit
    points = args.concurrencies or args.request_rates
    command = " ".join(["tandem"] + sys.argv[1:])
    results = []
    for name, serve_args in configs:
        proc, url = None, args.base_url
        if url is None:
            proc, url = start_server(args.model, serve_args,
                                     os.path.join(args.out, f"{name}.server.log"))
        try:
            for value in points:
                point_args, point = _point_args(args, value)
                summary, records = measure(point_args, url.rstrip("/"))
                result = {"config": name, "point": point, "serve_args": serve_args,
                          "device": device_label(args, proc is not None), "date": now(),
                          "git_commit": git_commit(), "command": command,
                          "concurrency": point_args.max_concurrency,
                          "request_rate": "inf" if math.isinf(point_args.request_rate)
                          else point_args.request_rate, **summary,
                          "requests": record_dicts(records)}
                with open(os.path.join(args.out, f"{name}_{point}.json"), "w") as f:
                    json.dump(result, f)
                results.append(result)
                print(f"{name:>12} {point:>8}  {summary['output_throughput']:10.1f} tok/s  "
                      f"TTFT p50 {1000 * (summary['ttft_s']['median'] or 0):9.1f} ms  "
                      f"TPOT p50 {1000 * (summary['tpot_s']['median'] or 0):8.2f} ms  "
                      f"failed {summary['failed']}", flush=True)
        finally:
            if proc is not None:
                stop_server(proc)
    lines = draw(results, args.out, args.num_gpus)
    print(json.dumps({"benchmark": "sweep", "out": args.out, "command": command,
                      "git_commit": git_commit(), "points": [
        {k: r[k] for k in ("config", "point", "output_throughput", "request_throughput",
                           "completed", "failed")} | {"ttft_p50_s": r["ttft_s"]["median"],
                                                      "tpot_p50_s": r["tpot_s"]["median"]}
        for r in results], "plots": sorted(lines)}))
    return 0 if all(r["completed"] for r in results) else 1


def add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", nargs="+", help="point JSON files written by bench sweep "
                                              "(.json or .json.gz)")
    p.add_argument("--out", required=True, help="directory for the plots")
    p.add_argument("--num-gpus", type=int, default=1)
    p.set_defaults(func=run_plot)


def run_plot(args: argparse.Namespace) -> int:
    results = [load_result(path) for path in args.results]
    lines = draw(results, args.out, args.num_gpus)
    print(json.dumps({"benchmark": "plot", "out": args.out,
                      "lines": {k: len(v) for k, v in lines.items()}}))
    return 0
