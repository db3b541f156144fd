"""What matmul rate is "warm"? The bf16 8192^3 matmul rate of this GPU under several
protocols, to choose how `tandem.bench.roofline.measure` finds the denominator of every
`roofline_fraction` (issue 16: a fraction must never flatter the result).

On one H200 (2026-12-02) the same machine gave 776.5 TFLOP/s as the first repeat after a
25 s throughput run, then ~650-660 sustained, and only 684 at best after a 215 ms prefill
run: back-to-back matmuls hit the power limit. A short workload runs at the higher clock,
so a denominator read while throttled flatters it.

    python scripts/diag_matmul_clock.py [--json F]

Protocols, each after 2 s idle:
  cold        20 matmuls back to back, each timed: the clock's ramp
  sustained   3 s back to back, the rate of each 100 ms window: the power limit
  bursts G    a 0.5 s ramp, then 10-matmul bursts with G ms idle between them, for 2 s:
              the best and median burst (G = 5, 20, 50, 200)
nvidia-smi's SM clock and power draw are read after each protocol where it answers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch

from tandem.bench.timing import per_call_s as timed

N = 8192
FLOPS = 2 * N ** 3


def smi() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    a = torch.randn(N, N, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, N, device="cuda", dtype=torch.bfloat16)
    mm = lambda: torch.mm(a, b)  # noqa: E731
    timed(mm, 3)  # handles, kernels chosen
    rec: dict = {"device": torch.cuda.get_device_name()}

    time.sleep(2)
    cold = [FLOPS / timed(mm, 1) / 1e12 for _ in range(20)]
    rec["cold_tflops"] = [round(x, 1) for x in cold]
    rec["cold_smi"] = smi()
    print(f"cold: first {cold[0]:.0f}, best {max(cold):.0f}, last {cold[-1]:.0f} TFLOP/s "
          f"[{rec['cold_smi']}]", flush=True)

    time.sleep(2)
    windows, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < 3.0:
        w0, n = time.perf_counter(), 0
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        while time.perf_counter() - w0 < 0.1:
            mm()
            n += 1
        end.record()
        end.synchronize()
        windows.append(FLOPS * n / (start.elapsed_time(end) / 1e3) / 1e12)
    rec["sustained_tflops"] = [round(x, 1) for x in windows]
    rec["sustained_smi"] = smi()
    print(f"sustained 3 s: first window {windows[0]:.0f}, best {max(windows):.0f}, last "
          f"{windows[-1]:.0f} TFLOP/s [{rec['sustained_smi']}]", flush=True)

    rec["bursts"] = {}
    for gap_ms in (5, 20, 50, 200):
        time.sleep(2)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.5:  # ramp the clock
            timed(mm, 10)
        rates, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < 2.0:
            time.sleep(gap_ms / 1e3)
            rates.append(FLOPS / timed(mm, 10) / 1e12)
        rec["bursts"][gap_ms] = {"best": round(max(rates), 1),
                                 "median": round(statistics.median(rates), 1),
                                 "count": len(rates), "smi": smi()}
        print(f"bursts of 10 with {gap_ms:3d} ms idle: best {max(rates):.0f}, median "
              f"{statistics.median(rates):.0f} TFLOP/s over {len(rates)} "
              f"[{rec['bursts'][gap_ms]['smi']}]", flush=True)
    line = json.dumps(rec)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line)
    print(line)


if __name__ == "__main__":
    main()
