"""The disaggregation KV path's bandwidth on one machine: a prefill engine's pool -> shared
memory -> a decode engine's pool, stage by stage, with the functions the engines use
(runner/kv_memory.read_blocks / write_blocks, disagg/connector.SharedMemoryConnector).

    export   read_blocks: the request's blocks gathered on the pool's device
    send     into the shared-memory mapping (device -> host for a GPU pool)
    recv     the mapping on the receiving side (no copy)
    import   write_blocks: mapping -> the receiving pool (host -> device)

The bound for a host-staged transfer is crossing the host link twice at the pinned-memory
copy rates measured here (device -> pinned host, pinned host -> device), on the same
bytes. Usage: python scripts/bench_kv_transfer.py [--model DIR] [--tokens 512,2048,8192]
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import uuid

import torch

from tandem.disagg.connector import KVPayload, SharedMemoryConnector
from tandem.runner.kv_memory import read_blocks, write_blocks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, reps: int) -> tuple[float, object]:
    """(best seconds of `reps` runs after one warm-up, the last result)."""
    out = fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="bench/configs/llama-3.1-8b")
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    layers, kv_heads = cfg["num_hidden_layers"], cfg.get("num_key_value_heads",
                                                         cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = [int(t) for t in args.tokens.split(",")]
    nblocks = max(sizes) // args.block_size + 1
    shape = (2, nblocks, args.block_size, kv_heads, head_dim)
    src = [torch.randn(shape, dtype=dtype, device=device) for _ in range(layers)]
    dst = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
    conn = SharedMemoryConnector(uuid.uuid4().hex)
    rows = []
    for tokens in sizes:
        n = tokens // args.block_size
        ids = list(range(1, n + 1))
        nbytes = sum(t[:, :n].numel() * t.element_size() for t in src)
        t_export, gathered = _timed(lambda: read_blocks(src, ids), device, args.reps)
        payload = KVPayload("r", list(range(n)), gathered)
        send_t, recv_t, import_t = [], [], []
        for _ in range(args.reps + 1):
            _sync(device)
            t0 = time.perf_counter()
            conn.send(payload)
            t1 = time.perf_counter()
            got = conn.recv("r")
            t2 = time.perf_counter()
            write_blocks(dst, ids, got.layers)
            _sync(device)
            t3 = time.perf_counter()
            send_t.append(t1 - t0)
            recv_t.append(t2 - t1)
            import_t.append(t3 - t2)
            del got
        assert all(torch.equal(a[:, 1:n + 1], b[:, 1:n + 1]) for a, b in zip(src, dst))
        s, r, i = min(send_t[1:]), min(recv_t[1:]), min(import_t[1:])
        total = t_export + s + r + i
        # the host link's rate with pinned memory, on the same bytes
        flat = torch.cat([g.reshape(-1) for g in gathered])
        pinned = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=device.type == "cuda")
        t_d2h, _ = _timed(lambda: pinned.copy_(flat, non_blocking=True), device, args.reps)
        t_h2d, _ = _timed(lambda: flat.copy_(pinned, non_blocking=True), device, args.reps)
        bound = t_d2h + t_h2d
        rows.append({"tokens": tokens, "blocks": n, "bytes": nbytes,
                     "export_s": t_export, "send_s": s, "recv_s": r, "import_s": i,
                     "total_s": total, "gb_per_s": nbytes / total / 1e9,
                     "pinned_d2h_gb_per_s": nbytes / t_d2h / 1e9,
                     "pinned_h2d_gb_per_s": nbytes / t_h2d / 1e9,
                     "bound_s": bound, "achieved_fraction": bound / total})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"KV transfer, host-staged shared memory, {args.model} ({layers} layers, "
          f"{kv_heads} KV heads x {head_dim}, {dtype}), block {args.block_size}, {name}")
    print(f"{'tokens':>7} {'MB':>8} {'export':>8} {'send':>8} {'recv':>7} {'import':>8} "
          f"{'total ms':>9} {'GB/s':>6} {'pinned d2h/h2d GB/s':>20} {'of bound':>8}")
    for w in rows:
        print(f"{w['tokens']:>7} {w['bytes'] / 1e6:>8.1f} {w['export_s'] * 1e3:>8.2f} "
              f"{w['send_s'] * 1e3:>8.2f} {w['recv_s'] * 1e3:>7.2f} {w['import_s'] * 1e3:>8.2f} "
              f"{w['total_s'] * 1e3:>9.2f} {w['gb_per_s']:>6.2f} "
              f"{w['pinned_d2h_gb_per_s']:>9.1f}/{w['pinned_h2d_gb_per_s']:<10.1f} "
              f"{w['achieved_fraction']:>8.2f}")
    print(json.dumps({"benchmark": "kv_transfer", "path": "host shared memory",
                      "device": name, "model": args.model, "dtype": str(dtype),
                      "block_size": args.block_size, "results": rows,
                      "median_gb_per_s": statistics.median(w["gb_per_s"] for w in rows),
                      "commit": os.environ.get("TANDEM_GIT_COMMIT")}))


if __name__ == "__main__":
    main()
