"""The served disaggregation path's transfer cost, measured by the server itself: start
`tandem serve MODEL --prefill-workers 1 --disagg-policy always --kv-connector C`, send
prompts one at a time (random token ids, so nothing is cached), then read /metrics:
bytes shipped, seconds to gather and send (prefill worker), seconds to import (decode
worker), per request. Prints a table, then one JSON line.

    python scripts/bench_disagg_serve.py MODEL --connectors ipc,shm --prompt-len 4096 \\
        --serve-args "--load-format dummy --gpu-memory-utilization 0.42 --max-model-len 8448"
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import httpx

from tandem.bench.serve_cli import start_server, stop_server


def _metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        out[series.split("{")[0] + ("{" + series.split("{")[1] if "route=" in series
                                    else "")] = float(value)
    return out


def run(model: str, connector: str, args: argparse.Namespace) -> dict:
    serve = (f"{args.serve_args} --prefill-workers 1 --disagg-policy always "
             f"--kv-connector {connector}")
    proc, url = start_server(model, serve, f"{args.log_dir}/disagg-{connector}.server.log")
    rng = random.Random(0)
    with open(os.path.join(model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    ttft = []
    try:
        for _ in range(args.num_prompts):
            prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", timeout=300, json={
                "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "ignore_eos": True})
            r.raise_for_status()
            ttft.append(time.perf_counter() - t0)
        m = _metrics(url)
    finally:
        stop_server(proc)
    n = m["tandem:kv_transfer_seconds_count"]
    per_bytes = m["tandem:kv_transfer_bytes_total"] / n
    send_s = m["tandem:kv_transfer_seconds_sum"] / n
    import_s = m["tandem:kv_import_seconds_sum"] / max(1, m["tandem:kv_import_seconds_count"])
    return {"connector": connector, "requests": int(n), "bytes_per_request": per_bytes,
            "gather_send_s": send_s, "import_s": import_s,
            "gb_per_s": per_bytes / (send_s + import_s) / 1e9,
            "median_request_s": sorted(ttft)[len(ttft) // 2],
            "fallbacks": m.get('tandem:disagg_requests_total{model_name="default",route='
                               '"fallback"}', None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--connectors", default="ipc,shm")
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--serve-args", default="")
    ap.add_argument("--log-dir", default=".")
    args = ap.parse_args()
    rows = [run(args.model, c, args) for c in args.connectors.split(",")]
    print(f"served 1P1D, {args.prompt_len}-token prompts, one at a time, {args.model}")
    print(f"{'connector':>9} {'MB/request':>10} {'gather+send ms':>14} {'import ms':>9} "
          f"{'GB/s':>6} {'request s':>9}")
    for w in rows:
        print(f"{w['connector']:>9} {w['bytes_per_request'] / 1e6:>10.1f} "
              f"{w['gather_send_s'] * 1e3:>14.2f} {w['import_s'] * 1e3:>9.2f} "
              f"{w['gb_per_s']:>6.2f} {w['median_request_s']:>9.3f}")
    print(json.dumps({"benchmark": "disagg_serve_transfer", "model": args.model,
                      "prompt_len": args.prompt_len, "serve_args": args.serve_args,
                      "rows": rows, "commit": os.environ.get("TANDEM_GIT_COMMIT")}))


if __name__ == "__main__":
    main()
