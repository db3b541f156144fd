"""The disaggregation KV path between two GPUs (`--kv-connector nccl`, disagg/p2p.py),
timed: a prefill-side rank on GPU 0 gathers a request's blocks from its pool and sends them
(P2PLink.send), a decode-side rank on GPU 1 receives them and writes them into its pool
(P2PLink.recv + runner/kv_memory.write_blocks). Llama-3.1-8B KV shapes by default.

The bound is a plain device-to-device copy of the same bytes from GPU 0 to GPU 1 (timed
here too): fraction = copy time / transfer time. Prints a table, then one JSON line.

    python scripts/bench_kv_p2p.py [--model DIR] [--tokens 512,2048,8192]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import time

import torch
import torch.multiprocessing as mp

from tandem.envs import NO_NVLINK_MULTICAST

os.environ.update(NO_NVLINK_MULTICAST)  # never NVLink multicast


def _shapes(args: argparse.Namespace) -> tuple[int, tuple[int, ...]]:
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    nblocks = max(args.sizes) // args.block_size + 1
    return cfg["num_hidden_layers"], (2, nblocks, args.block_size, heads, dim)


def _rank(rank: int, args: argparse.Namespace, init: str, out: dict) -> None:
    import torch.distributed as dist

    from tandem.disagg.connector import KVPayload
    from tandem.disagg.p2p import P2PGroup, P2PLink
    from tandem.runner.kv_memory import read_blocks, write_blocks
    cuda = torch.cuda.device_count() >= 2
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    link = P2PLink(P2PGroup(init, rank, 2), device)
    layers, shape = _shapes(args)
    dtype = torch.bfloat16 if cuda else torch.float32
    pool = [(torch.randn if rank == 0 else torch.zeros)(shape, dtype=dtype, device=device)
            for _ in range(layers)]
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    rows = []
    for tokens in args.sizes:
        n = tokens // args.block_size
        ids = list(range(1, n + 1))
        times = []
        for _ in range(args.reps + 1):
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            if rank == 0:
                link.send(KVPayload("r", list(range(n)), read_blocks(pool, ids)), dst=1)
                link._sending[-1][0].wait()
            else:  # the header the control message would carry, built here: no NCCL
                # collective may interleave with the pending send (separate communicators
                # issued in different orders can deadlock)
                header = pickle.dumps((0, (layers, 2, n, *shape[2:]), str(dtype),
                                       list(range(n))))
                write_blocks(pool, ids, link.recv("r", header).layers)
            sync()
            times.append(time.perf_counter() - t0)
        if rank == 1:
            nbytes = sum(t[:, 1:n + 1].numel() * t.element_size() for t in pool)
            rows.append({"tokens": tokens, "bytes": nbytes, "transfer_s": min(times[1:])})
    if rank == 1 and cuda:  # the bound: a plain GPU 0 -> GPU 1 copy of the same bytes
        for row in rows:
            src = torch.empty(row["bytes"], dtype=torch.uint8, device="cuda:0")
            dst = torch.empty_like(src, device=device)
            best = float("inf")
            for _ in range(args.reps + 1):
                torch.cuda.synchronize(0)
                sync()
                t0 = time.perf_counter()
                dst.copy_(src)
                torch.cuda.synchronize(0)
                sync()
                best = min(best, time.perf_counter() - t0)
            row["copy_s"] = best
        out["rows"] = rows
    elif rank == 1:
        out["rows"] = rows
    out["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
    link.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="bench/configs/llama-3.1-8b")
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    args.sizes = [int(t) for t in args.tokens.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(args, init, out), nprocs=2, join=True)
    rows = out["rows"]
    print(f"KV point to point, {args.model}, block {args.block_size}, {out['device']}")
    print(f"{'tokens':>7} {'MB':>8} {'transfer ms':>11} {'GB/s':>7} {'copy GB/s':>9} "
          f"{'of copy':>7}")
    for r in rows:
        r["gb_per_s"] = r["bytes"] / r["transfer_s"] / 1e9
        if "copy_s" in r:
            r["copy_gb_per_s"] = r["bytes"] / r["copy_s"] / 1e9
            r["achieved_fraction"] = r["copy_s"] / r["transfer_s"]
        print(f"{r['tokens']:>7} {r['bytes'] / 1e6:>8.1f} {r['transfer_s'] * 1e3:>11.2f} "
              f"{r['gb_per_s']:>7.1f} {r.get('copy_gb_per_s', 0):>9.1f} "
              f"{r.get('achieved_fraction', 0):>7.2f}")
    print(json.dumps({"benchmark": "kv_p2p", "device": out["device"], "model": args.model,
                      "block_size": args.block_size, "rows": rows,
                      "commit": os.environ.get("TANDEM_GIT_COMMIT")}))


if __name__ == "__main__":
    main()
