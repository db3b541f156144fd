"""Can decode attention hide under the GEMMs? Llama-3.1-8B shapes on one GPU: a decode
batch's MLP GEMMs (o_proj, gate_up, silu*mul, down) on one stream and another batch's decode
attention (the Triton split-K kernel, bf16 cache) on a second, against the same work run one
after the other, with cuBLAS told to leave `carveout` SMs to the other stream
(torch._C._set_sm_carveout_experimental). Everything is captured in CUDA graphs and timed
with CUDA events.

    python scripts/bench_overlap.py [--batch 512] [--ctx 640] [--json F]

Prints a table and one JSON line: microseconds per (GEMMs + attention) pair, serial and
overlapped, and the fraction of the attention hidden."""

from __future__ import annotations

import argparse
import json
import random

import torch
import torch.nn.functional as F

from tandem.bench.timing import replay_us
from tandem.kernels import kv_cache_shape
from tandem.kernels.triton.decode import decode_attention

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--batch", type=int, nargs="+", default=[256, 512])
ap.add_argument("--ctx", type=int, default=640)
ap.add_argument("--carveouts", type=int, nargs="+", default=[0, 8, 16, 24, 32, 48, 66])
ap.add_argument("--blas", nargs="+", default=["cublas", "cublaslt"],
                help="torch.backends.cuda.preferred_blas_library values to try")
ap.add_argument("--eager", action="store_true",
                help="launch from Python (no CUDA graph), so the launch order is the issue "
                "order: the side stream's work goes in after the GEMMs it should share with")
ap.add_argument("--json")
args = ap.parse_args()
DEV, BLOCK, H, HKV, D, HID, INTER = "cuda", 16, 32, 8, 128, 4096, 14336
PAIRS = 8  # (GEMMs, attention) pairs per graph, distinct tensors so L2 does not carry over


def weights():
    w = lambda n, k: torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02  # noqa: E731
    return w(HID, H * D), w(2 * INTER, HID), w(HID, INTER)


def decode_batch(seqs: int, ctx: int, seed: int):
    rng = random.Random(seed)
    need = -(-ctx // BLOCK)
    pool = list(range(seqs * need + 1))
    rng.shuffle(pool)
    tables = torch.tensor([[pool.pop() for _ in range(need)] for _ in range(seqs)],
                          dtype=torch.int32, device=DEV)
    cache = torch.randn(kv_cache_shape(seqs * need + 1, BLOCK, HKV, D), device=DEV,
                        dtype=torch.bfloat16)
    q = torch.randn(seqs, H, D, device=DEV, dtype=torch.bfloat16)
    qsl = torch.arange(seqs + 1, dtype=torch.int32, device=DEV)
    lens = torch.full((seqs,), ctx, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    return lambda: decode_attention(q, cache, out, qsl, lens, tables, D ** -0.5,
                                    max_seq_len=ctx + 64, num_decodes=seqs)


def mlp(x, wo, wgu, wd):
    g = F.linear(F.linear(x, wo), wgu)
    return F.linear(F.silu(g[:, :INTER]) * g[:, INTER:], wd)


def graph_of(body):
    body()
    if args.eager:
        torch.cuda.synchronize()
        return body
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    g.replay()
    torch.cuda.synchronize()
    return g


def best_us(g, repeats: int = 7) -> float:
    if callable(g):  # eager: the body itself, timed with events
        times = []
        for _ in range(repeats):
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            g()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return min(times) / PAIRS
    return min(replay_us(g) for _ in range(repeats)) / PAIRS


rows = []
side = torch.cuda.Stream()


def concurrency_probe() -> dict:
    """Do kernels on two streams run at once at all here? One-block sleeps, then two
    carved-out GEMMs: one after the other, and on two streams."""
    main = torch.cuda.current_stream()
    a = torch.randn(4096, 4096, device=DEV, dtype=torch.bfloat16)

    def pair(fn, streams: bool) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        side.wait_stream(main)
        fn()
        if streams:
            with torch.cuda.stream(side):
                fn()
        else:
            fn()
        main.wait_stream(side)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3

    sleep = lambda: torch.cuda._sleep(20_000_000)  # noqa: E731 (~10 ms on one SM)
    torch._C._set_sm_carveout_experimental(66)
    torch.backends.cuda.preferred_blas_library("cublaslt")
    gemm = lambda: [a @ a for _ in range(8)]  # noqa: E731
    out = {"sleep_serial_us": pair(sleep, False), "sleep_streams_us": pair(sleep, True),
           "gemm66_serial_us": pair(gemm, False), "gemm66_streams_us": pair(gemm, True)}
    torch._C._set_sm_carveout_experimental(None)
    torch.backends.cuda.preferred_blas_library("cublas")
    print("concurrency probe: " + ", ".join(f"{k} {v:.0f}" for k, v in out.items()), flush=True)
    return out


probe = concurrency_probe()
for batch in args.batch:
    ws = [weights() for _ in range(2)]
    xs = [torch.randn(batch, H * D, device=DEV, dtype=torch.bfloat16) for _ in range(PAIRS)]
    attns = [decode_batch(batch, args.ctx, seed=i) for i in range(PAIRS)]
    kv_bytes = batch * args.ctx * HKV * D * 2 * 2
    flops = 2 * batch * (HID * H * D + 2 * INTER * HID + HID * INTER)

    def gemms_only():
        for i in range(PAIRS):
            mlp(xs[i], *ws[i % 2])

    def attn_only():
        for i in range(PAIRS):
            attns[i]()

    def serial():
        for i in range(PAIRS):
            mlp(xs[i], *ws[i % 2])
            attns[i]()

    def overlapped():  # attention i on the side stream beside GEMMs i, joined each pair
        main = torch.cuda.current_stream()
        for i in range(PAIRS):
            side.wait_stream(main)
            if args.eager:  # GEMMs issued first: their persistent CTAs hold their SMs
                mlp(xs[i], *ws[i % 2])
            with torch.cuda.stream(side):
                attns[i]()
            if not args.eager:
                mlp(xs[i], *ws[i % 2])
            main.wait_stream(side)

    t_attn = best_us(graph_of(attn_only))
    for blas, carve in [(b, c) for b in args.blas for c in args.carveouts]:
        torch.backends.cuda.preferred_blas_library(blas)
        torch._C._set_sm_carveout_experimental(carve or None)
        t_gemm = best_us(graph_of(gemms_only))
        t_serial = best_us(graph_of(serial))
        t_over = best_us(graph_of(overlapped))
        torch._C._set_sm_carveout_experimental(None)
        hidden = (t_serial - t_over) / t_attn
        row = dict(batch=batch, ctx=args.ctx, blas=blas, carveout=carve, gemm_us=round(t_gemm, 1),
                   attn_us=round(t_attn, 1), serial_us=round(t_serial, 1),
                   overlap_us=round(t_over, 1), attention_hidden=round(hidden, 3),
                   gemm_tflops=round(flops / t_gemm / 1e6, 1),
                   attn_tb_s=round(kv_bytes / t_attn / 1e6, 2))
        rows.append(row)
        print(f"B={batch:4d} {blas:8s} carve={carve:3d}  gemm {t_gemm:7.1f} us ({row['gemm_tflops']:5.1f}"
              f" TFLOP/s)  attn {t_attn:6.1f} us ({row['attn_tb_s']:.2f} TB/s)  serial "
              f"{t_serial:7.1f}  overlapped {t_over:7.1f}  hidden {hidden:5.2f}", flush=True)
rec = dict(device=torch.cuda.get_device_name(), workload="llama-3.1-8b mlp gemms + decode "
           "attention, two streams", eager=args.eager, probe=probe,
           rows=rows)
print(json.dumps(rec))
if args.json:
    with open(args.json, "w") as f:
        json.dump(rec, f)
