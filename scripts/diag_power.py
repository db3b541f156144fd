"""Runs a command while `nvidia-smi` samples GPU 0 every 100 ms, then says how the GPU ran:
board power against its enforced limit, the SM clock against its maximum, and the share of
samples in which the driver held the clock down for power (`sw_power_cap`) or heat. A
compute-bound run that spends its time at the power cap cannot reach the rate of a short,
unthrottled matmul burst, whatever its kernels do; this measures how long that was.

    python scripts/diag_power.py --json power.json -- python3 -m tandem bench throughput ...

Samples below 100 W (the GPU idle while the command loads or compiles) are left out of the
busy figures. The command's own output passes through; the summary table and one JSON line
come last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

FIELDS = ["power.draw", "enforced.power.limit", "clocks.sm", "clocks.max.sm",
          "clocks.mem", "temperature.gpu"]
REASONS = ["sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_power_brake_slowdown"]
BUSY_W = 100.0


def query_fields() -> list[str]:
    """The reason fields are `clocks_event_reasons.*` on newer drivers and
    `clocks_throttle_reasons.*` on older ones; use whichever this driver accepts."""
    for prefix in ("clocks_event_reasons", "clocks_throttle_reasons"):
        fields = FIELDS + [f"{prefix}.{r}" for r in REASONS]
        probe = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={','.join(fields)}",
                                "--format=csv,noheader,nounits"], capture_output=True, text=True)
        if probe.returncode == 0:
            return fields
    raise SystemExit(f"nvidia-smi refused both reason field names: {probe.stdout}{probe.stderr}")


def parse(line: str, fields: list[str]) -> dict[str, float] | None:
    values = [v.strip() for v in line.split(",")]
    if len(values) != len(fields):
        return None
    row: dict[str, float] = {}
    for name, value in zip(fields, values):
        key = name.rsplit(".", 1)[-1] if "reasons" in name else name
        if value == "Active":
            row[key] = 1.0
        elif value == "Not Active":
            row[key] = 0.0
        else:
            try:
                row[key] = float(value)
            except ValueError:
                return None
    return row


def summarize(rows: list[dict[str, float]]) -> dict:
    busy = [r for r in rows if r["power.draw"] >= BUSY_W]
    out: dict = {"samples": len(rows), "busy_samples": len(busy)}
    if not busy:
        return out
    out.update(
        power_limit_w=busy[0]["enforced.power.limit"],
        power_w_median=statistics.median(r["power.draw"] for r in busy),
        power_w_max=max(r["power.draw"] for r in busy),
        sm_clock_max_mhz=busy[0]["clocks.max.sm"],
        sm_clock_mhz_median=statistics.median(r["clocks.sm"] for r in busy),
        sm_clock_mhz_min=min(r["clocks.sm"] for r in busy),
        mem_clock_mhz_median=statistics.median(r["clocks.mem"] for r in busy),
        temperature_c_max=max(r["temperature.gpu"] for r in busy),
    )
    for reason in REASONS:
        out[f"{reason}_share"] = sum(r[reason] for r in busy) / len(busy)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval-ms", type=int, default=100)
    parser.add_argument("--json", help="also write the JSON summary here")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    fields = query_fields()
    sampler = subprocess.Popen(
        ["nvidia-smi", "-i", "0", f"--query-gpu={','.join(fields)}",
         "--format=csv,noheader,nounits", f"--loop-ms={args.interval_ms}"],
        stdout=subprocess.PIPE, text=True)
    start = time.perf_counter()
    rc = subprocess.run(command).returncode
    wall = time.perf_counter() - start
    sampler.terminate()
    lines, _ = sampler.communicate()
    rows = [r for r in (parse(line, fields) for line in lines.splitlines()) if r]
    summary = {"command": command, "rc": rc, "wall_s": wall, **summarize(rows)}
    print(f"\n{'figure':<30} value")
    for key, value in summary.items():
        if key != "command":
            print(f"{key:<30} {value:.3f}" if isinstance(value, float) else f"{key:<30} {value}")
    line = json.dumps(summary)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    sys.exit(rc)


if __name__ == "__main__":
    main()
