"""The fused batch-1 decode matmuls (kernels/triton/norm_gemv.py) against the kernels they
replace, on Llama-3.1-8B's shapes, and a tile sweep of them and of the plain GEMVs (o, down).
Each case runs 200 times inside one CUDA graph (PDL as the engine launches it), its weights
cycled through copies past the L2. Usage: python scripts/bench_norm_gemv.py [--json F]"""

from __future__ import annotations

import argparse
import json

import torch

from tandem.kernels.triton import elementwise as ew
from tandem.kernels.triton import norm_gemv
from tandem.kernels.triton.gemv import default_config, gemv
from tandem.kernels.triton.kv_write import write_kv

H, HKV, D, HIDDEN, INTER = 32, 8, 128, 4096, 14336
DT = torch.bfloat16
FUSED = [(4, 1024, 8, 4), (2, 1024, 4, 4), (4, 512, 4, 4), (4, 2048, 8, 2), (8, 512, 8, 4),
         (8, 1024, 8, 3), (8, 1024, 4, 4), (16, 512, 8, 3), (16, 1024, 8, 2)]
PLAIN = {"o": [(4, 1024, 8, 4), (2, 1024, 4, 4), (8, 512, 8, 4), (8, 1024, 8, 3),
               (4, 512, 4, 4)],
         "down": [(16, 1024, 8, 4), (8, 1024, 8, 4), (16, 512, 8, 4), (32, 512, 8, 3),
                  (8, 2048, 8, 3)]}


def timed(fn, iters: int = 200) -> float:
    """us per call: `iters` calls captured in one graph, best of 3 replays."""
    for _ in range(3):
        fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    g.replay()
    best = float("inf")
    for _ in range(3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        best = min(best, s.elapsed_time(e) / iters * 1e3)
    return best


def weights(n: int, k: int, copies: int) -> list[torch.Tensor]:
    return [torch.randn(n, k, device="cuda", dtype=DT) / k**0.5 for _ in range(copies)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    x = torch.randn(1, HIDDEN, device="cuda", dtype=DT)
    r = torch.randn(1, HIDDEN, device="cuda", dtype=DT)
    nw = torch.ones(HIDDEN, device="cuda", dtype=DT)
    inv = 1.0 / (500000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    emb = torch.outer(torch.arange(1024, dtype=torch.float32), inv).repeat(1, 2)
    cos, sin = emb.cos().cuda(), emb.sin().cuda()
    pos = torch.tensor([700], device="cuda")
    cache = torch.zeros(2, 64, 16, HKV, D, device="cuda", dtype=DT)
    slot = torch.tensor([100], device="cuda")
    out: dict = {"device": torch.cuda.get_device_name(), "cases": []}

    def record(name: str, cfg, us: float, nbytes: int) -> None:
        out["cases"].append({"case": name, "config": cfg, "us": us, "GBps": nbytes / us / 1e3})
        print(f"{name:<28} {str(cfg):<22} {us:8.2f} us  {nbytes / us / 1e3:6.0f} GB/s", flush=True)

    n_qkv = (H + 2 * HKV) * D
    wq = weights(n_qkv, HIDDEN, 4)
    it = iter(range(10**9))

    def plain_qkv():
        h, _ = ew.fused_add_rms_norm(x, r, nw, 1e-5)
        qkv = gemv(h, wq[next(it) % 4])
        q = qkv[:, :H * D].view(1, H, D)
        k = qkv[:, H * D:(H + HKV) * D].view(1, HKV, D)
        v = qkv[:, (H + HKV) * D:].view(1, HKV, D)
        ew.rotary(pos, q, k, cos, sin)
        write_kv(k, v, cache, slot)

    record("qkv unfused (4 kernels)", default_config(n_qkv, HIDDEN), timed(plain_qkv),
           n_qkv * HIDDEN * 2)
    for cfg in FUSED:
        try:
            us = timed(lambda: norm_gemv.norm_qkv_rotary_kv(
                x, r, nw, 1e-5, wq[next(it) % 4], None, pos, cos, sin, cache, slot,
                (1.0, 1.0), H, HKV, config=cfg))
        except Exception as exc:  # out of resources
            print(f"qkv fused {cfg}: {exc!r}"[:120])
            continue
        record("qkv fused", cfg, us, n_qkv * HIDDEN * 2)
    del wq

    wg = weights(2 * INTER, HIDDEN, 2)

    def plain_gate_up():
        h, _ = ew.fused_add_rms_norm(x, r, nw, 1e-5)
        ew.silu_and_mul(gemv(h, wg[next(it) % 2]))

    record("gate_up unfused (3 kernels)", default_config(2 * INTER, HIDDEN),
           timed(plain_gate_up), 2 * INTER * HIDDEN * 2)
    for cfg in FUSED:
        try:
            us = timed(lambda: norm_gemv.norm_gate_up_silu(x, r, nw, 1e-5, wg[next(it) % 2],
                                                           None, config=cfg))
        except Exception as exc:
            print(f"gate_up fused {cfg}: {exc!r}"[:120])
            continue
        record("gate_up fused", cfg, us, 2 * INTER * HIDDEN * 2)
    del wg

    for name, (n, k) in {"o": (HIDDEN, H * D), "down": (HIDDEN, INTER)}.items():
        ws = weights(n, k, 8 if name == "o" else 4)
        xs = torch.randn(1, k, device="cuda", dtype=DT)
        for cfg in PLAIN[name]:
            try:
                us = timed(lambda: gemv(xs, ws[next(it) % len(ws)], config=cfg))
            except Exception as exc:
                print(f"{name} {cfg}: {exc!r}"[:120])
                continue
            record(f"{name} gemv", cfg, us, n * k * 2)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
