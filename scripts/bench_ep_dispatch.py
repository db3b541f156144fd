"""Expert parallelism's token exchange, timed: allreduce against alltoall
(distributed/expert_dispatch.py) over N ranks, at decode and prefill token counts, with
Qwen3-30B-A3B's routing shape (hidden 2048, 128 experts, top 8) and uniform random routing.

The experts are replaced by a cheap stand-in (each row scaled by its weights' sum), so the
times are the exchange alone: both methods compute every (token, expert) pair once, on the
expert's owner, and differ only in what crosses the link and the host syncs.

    python scripts/bench_ep_dispatch.py [--ranks 2] [--tokens 1,8,64,256,1024,4096,8192]

CUDA (NCCL, one GPU per rank) when there are enough GPUs, else CPU (gloo). Prints a table,
then one JSON line: per token count the median microseconds of each method and the faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tandem.envs import NO_NVLINK_MULTICAST

os.environ.update(NO_NVLINK_MULTICAST)  # never NVLink multicast


def _worker(rank: int, args: argparse.Namespace, port: int, out: dict) -> None:
    from tandem.distributed.expert_dispatch import allreduce_dispatch, alltoall_dispatch
    from tandem.distributed.parallel import ParallelContext

    cuda = torch.cuda.device_count() >= args.ranks
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.ranks)
    parallel = ParallelContext(rank, args.ranks, dist.group.WORLD, None, True)
    count = args.experts // args.ranks
    dtype = torch.bfloat16 if cuda else torch.float32

    def experts(x, w, ids):  # the stand-in: (rows, H) * sum of the local slots' weights
        return x * (w * (ids >= 0)).sum(dim=1, keepdim=True).to(x.dtype)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    results = {}
    for t in args.tokens:
        g = torch.Generator().manual_seed(t)  # the same routing on every rank
        x = torch.randn(t, args.hidden, generator=g).to(device, dtype)
        ids = torch.stack([torch.randperm(args.experts, generator=g)[:args.top_k]
                           for _ in range(t)]).to(device, torch.int32)
        w = torch.rand(t, args.top_k, generator=g).to(device)
        row = {}
        for name, fn in (("allreduce", allreduce_dispatch), ("alltoall", alltoall_dispatch)):
            for _ in range(3):
                fn(parallel, experts, x.clone(), w, ids, rank * count, count)
            times = []
            for _ in range(args.iters):
                xi = x.clone()
                sync()
                dist.barrier()
                t0 = time.perf_counter()
                fn(parallel, experts, xi, w, ids, rank * count, count)
                sync()
                times.append((time.perf_counter() - t0) * 1e6)
            row[f"{name}_us"] = statistics.median(times)
        a, b = row["allreduce_us"], row["alltoall_us"]
        row["faster"] = "allreduce" if a <= b else "alltoall"
        results[t] = row
    if rank == 0:
        out.update(device=torch.cuda.get_device_name(device) if cuda else "cpu (gloo)",
                   results=results)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", default="1,8,64,256,1024,4096,8192")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    from tandem.executor.multiproc import free_port
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(args, free_port(), out), nprocs=args.ranks)
        out = dict(out)
    print(f"{'tokens':>7s} {'allreduce us':>13s} {'alltoall us':>12s}  faster")
    for t, row in out["results"].items():
        print(f"{t:7d} {row['allreduce_us']:13.1f} {row['alltoall_us']:12.1f}  {row['faster']}")
    print(json.dumps({"bench": "ep_dispatch", "device": out["device"], "ranks": args.ranks,
                      "hidden": args.hidden, "experts": args.experts, "top_k": args.top_k,
                      "results": {str(t): r for t, r in out["results"].items()}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
