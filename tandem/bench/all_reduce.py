"""`python -m tandem.bench.all_reduce`: the custom IPC all-reduce against NCCL, bf16 sums
of 2 KB .. 64 MB on --world-size GPUs of this host (it spawns one process per rank).

Each size is timed warm with CUDA events on rank 0, two ways:

    eager   N back-to-back calls from Python (includes the host's launch cost)
    graph   one CUDA graph of --graph-calls back-to-back all-reduces, replayed: the GPU
            time per all-reduce, launch overhead removed (what decode under graphs pays)

Bound: moving the message once over the link at --link-gbps (390 GB/s, the measured
device-to-device copy rate between two H200s): bound_us = bytes / link rate, and
fraction = bound_us / measured_us (= algorithm bandwidth bytes / time over the link rate).
Prints a table, then one JSON object as the last stdout line. NVLink multicast stays off.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tandem.bench.timing import graph_us
from tandem.distributed.custom_all_reduce import join_cuda_group
from tandem.envs import NO_NVLINK_MULTICAST


def _eager_us(fn: Callable[[], Any], iters: int) -> float:
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def _graph_us(fn: Callable[[], Any], calls: int, replays: int) -> float:
    """Per all-reduce, from a graph of `calls` of them (compiled and communicators up
    first: three eager rounds), the median of `replays` replays."""
    return graph_us(fn, calls=calls, repeats=replays, warmup=3)


def _measure(car, x: torch.Tensor, calls: int) -> dict[str, float | None]:
    nbytes = x.numel() * x.element_size()
    iters = max(20, min(500, 2**28 // nbytes))
    replays = max(3, min(20, 2**30 // (nbytes * calls)))
    row: dict[str, float | None] = {"custom_eager_us": None, "custom_graph_us": None}
    if car.should_use(x):
        row["custom_eager_us"] = _eager_us(lambda: car.all_reduce(x), iters)
        row["custom_graph_us"] = _graph_us(lambda: car.all_reduce(x), calls, replays)
    row["nccl_eager_us"] = _eager_us(lambda: dist.all_reduce(x), iters)
    row["nccl_graph_us"] = _graph_us(lambda: dist.all_reduce(x), calls, replays)
    return row


def _rank_main(rank: int, world: int, port: int, sizes: list[int], calls: int,
               result_path: str) -> None:
    from tandem.bench.cli import device_name

    device, car = join_cuda_group(rank, world, port, max(sizes))
    rows = []
    for nbytes in sizes:
        # zeros: repeated in-place NCCL sums stay finite; the traffic is the same
        x = torch.zeros(nbytes // 2, dtype=torch.bfloat16, device=device)
        rows.append({"bytes": nbytes, **_measure(car, x, calls)})
        del x
        torch.cuda.empty_cache()
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump({"device": device_name(device), "rows": rows,
                       "custom_disabled": car.disabled_reason}, f)
    car.close()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _label(nbytes: int) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def _fmt(v: float | None, spec: str) -> str:
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


def _add_bounds(rows: list[dict[str, Any]], link_gbps: float) -> None:
    for row in rows:
        row["bound_us"] = row["bytes"] / (link_gbps * 1e3)  # bytes / (GB/s) -> us
        for who in ("custom", "nccl"):
            us = row[f"{who}_graph_us"]
            row[f"{who}_graph_GBps"] = None if us is None else row["bytes"] / (us * 1e3)
            row[f"{who}_graph_fraction"] = None if us is None else row["bound_us"] / us


def _print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'size':>7}  {'custom eager':>12}  {'custom graph':>12}  {'nccl eager':>10}  "
            f"{'nccl graph':>10}  {'custom GB/s':>11}  {'frac':>5}  {'nccl GB/s':>9}  "
            f"{'frac':>5}")
    print("latency in us per all-reduce; GB/s = bytes / graph latency; frac = of the link")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{_label(r['bytes']):>7}  {_fmt(r['custom_eager_us'], '12.1f')}  "
              f"{_fmt(r['custom_graph_us'], '12.1f')}  {_fmt(r['nccl_eager_us'], '10.1f')}  "
              f"{_fmt(r['nccl_graph_us'], '10.1f')}  {_fmt(r['custom_graph_GBps'], '11.1f')}  "
              f"{_fmt(r['custom_graph_fraction'], '5.3f')}  {_fmt(r['nccl_graph_GBps'], '9.1f')}  "
              f"{_fmt(r['nccl_graph_fraction'], '5.3f')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem.bench.all_reduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--min-bytes", type=int, default=2 * 2**10)
    p.add_argument("--max-bytes", type=int, default=64 * 2**20)
    p.add_argument("--graph-calls", type=int, default=50, help="all-reduces per CUDA graph")
    p.add_argument("--link-gbps", type=float, default=390.0,
                   help="device-to-device copy rate between the GPUs, GB/s (the bound)")
    args = p.parse_args(argv)
    os.environ.update(NO_NVLINK_MULTICAST)
    if torch.cuda.device_count() < args.world_size:
        print(f"needs {args.world_size} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 1
    sizes, n = [], args.min_bytes
    while n <= args.max_bytes:
        sizes.append(n)
        n *= 2
    with tempfile.TemporaryDirectory() as tmp:  # rank 0 writes its rows here
        path = os.path.join(tmp, "result.json")
        mp.start_processes(_rank_main, nprocs=args.world_size, join=True,
                           start_method="spawn",
                           args=(args.world_size, _free_port(), sizes, args.graph_calls, path))
        with open(path) as f:
            result = json.load(f)
    rows = result["rows"]
    _add_bounds(rows, args.link_gbps)
    _print_table(rows)
    if result["custom_disabled"]:
        print(f"custom all-reduce disabled: {result['custom_disabled']}")
    from tandem.bench.cli import git_commit
    record = {
        "benchmark": "all_reduce", "device": result["device"],
        "workload": {"op": "sum", "dtype": "bfloat16", "sizes_bytes": sizes,
                     "graph_calls": args.graph_calls, "timing": "CUDA events on rank 0"},
        "world_size": args.world_size, "rows": rows,
        "bound": {"link_GBps": args.link_gbps,
                  "bound_us": "bytes / link rate (message moved once over the link)",
                  "fraction": "bound_us / measured graph us = (bytes / us) / link rate"},
        "custom_disabled": result["custom_disabled"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m tandem.bench.all_reduce"] + sys.argv[1:]),
        "git_commit": git_commit()}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
