"""Read a chrome trace from scripts/diag_decode.py and show where one decode step's GPU time
goes outside the per-layer kernels: the kernels between two layer sequences and every gap
(GPU idle) above a threshold. Usage: python scripts/diag_trace.py TRACE_JSON [GAP_US]"""

from __future__ import annotations

import json
import sys

LAYER = {"_gemv_kernel", "_decode_kernel", "_rms_norm_kernel", "_rotary_kernel",
         "_silu_and_mul_kernel", "_write_kv_kernel"}
trace = json.load(open(sys.argv[1]))
gap_us = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
kernels = sorted((e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy",
                                                                      "gpu_memset")),
                 key=lambda e: e["ts"])
# the decode steps: the last 10 windows that start with a layer kernel after non-layer work
busy = sum(e["dur"] for e in kernels)
span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
print(f"{len(kernels)} GPU events, busy {busy / 1e3:.2f} ms of {span / 1e3:.2f} ms")
tail = kernels[-len(kernels) // 3:]
prev_end = tail[0]["ts"]
idle = outside = 0.0
for e in tail:
    gap = e["ts"] - prev_end
    idle += max(gap, 0)
    name = e["name"].split("(")[0][:60]
    if e["name"] not in LAYER:
        outside += e["dur"]
    if gap > gap_us or e["name"] not in LAYER:
        print(f"  gap {gap:7.1f} us  {e['dur']:7.1f} us  {name}")
    prev_end = max(prev_end, e["ts"] + e["dur"])
print(f"last third: idle {idle / 1e3:.3f} ms, non-layer kernels {outside / 1e3:.3f} ms, "
      f"span {(prev_end - tail[0]['ts']) / 1e3:.3f} ms")
