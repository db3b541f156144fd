"""Soak a tandem server: mixed traffic for minutes, with RSS and the KV gauges over time.

    python scripts/soak.py                        # start `tandem serve` (default model), 8 min
    python scripts/soak.py --duration 60 --concurrency 16
    python scripts/soak.py --base-url http://127.0.0.1:8000 --pid 1234

Traffic, from --concurrency client loops on one asyncio loop (seeded): streaming and plain
completions, chat, n > 1, several prompts per request, logprobs, and clients that hang up
mid-stream (--disconnect-rate). Every --sample-interval seconds one line: the RSS of the
server and its engine process (from /proc, when the pid is known), running/waiting requests and KV-cache usage from /metrics,
and the counts so far. At the end the server must be idle with no KV block held, every
request must have completed (or been cut by its own client), and the last stdout line is
one JSON object with the samples. Not a CI test: run it by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

import httpx

from tandem.bench.serve_cli import parse_metrics, start_server, stop_server

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class LinkedList:\n",
           "def read_config(path):\n    ", "for i in range(10):", "# Parse the arguments\n",
           "async def fetch(url):\n", "def quicksort(xs):\n    \"\"\""]


def _rss_mb(pid: int | None) -> float | None:
    """RSS of the server and its child processes (the engine process), in MB."""
    if pid is None:
        return None
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):  # it ended meanwhile
            pass
    return total / 1024


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, pid: int | None) -> None:
        self.args, self.url, self.pid = args, url, pid
        self.rng = random.Random(args.seed)
        self.counts = {"completed": 0, "disconnected": 0, "failed": 0}
        self.errors: list[str] = []
        self.samples: list[dict] = []

    def _request(self) -> tuple[str, dict, bool]:
        rng = self.rng
        kind = rng.random()
        stream = rng.random() < 0.7
        common = {"max_tokens": rng.randint(8, 160), "temperature": rng.choice([0, 0.8]),
                  "stream": stream}
        if kind < 0.55:
            return "/v1/completions", {"prompt": rng.choice(PROMPTS), **common}, stream
        if kind < 0.7:
            return "/v1/completions", {"prompt": rng.sample(PROMPTS, 2), "n": 2,
                                       "logprobs": 2, **common}, stream
        return "/v1/chat/completions", {"messages": [
            {"role": "user", "content": rng.choice(PROMPTS)}], "n": rng.choice([1, 2]),
            **common}, stream

    async def client_loop(self, client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            path, body, stream = self._request()
            cut = stream and self.rng.random() < self.args.disconnect_rate
            try:
                if stream:
                    async with client.stream("POST", path, json=body) as r:
                        if r.status_code != 200:
                            raise RuntimeError(f"{r.status_code} {(await r.aread())[:200]}")
                        events, last = 0, ""
                        async for line in r.aiter_lines():
                            if not line:
                                continue
                            events, last = events + 1, line
                            if cut and events >= 3:
                                break  # hang up mid-stream
                            if line.startswith("data: {\"error\""):
                                raise RuntimeError(line[:200])
                        if not cut and last != "data: [DONE]":
                            raise RuntimeError(f"stream ended without [DONE]: {last[:200]}")
                else:
                    r = await client.post(path, json=body)
                    if r.status_code != 200:
                        raise RuntimeError(f"{r.status_code} {r.text[:200]}")
                self.counts["disconnected" if cut else "completed"] += 1
            except Exception as e:  # counted and reported, the soak goes on
                self.counts["failed"] += 1
                if len(self.errors) < 10:
                    self.errors.append(repr(e)[:300])

    async def sampler(self, client: httpx.AsyncClient, deadline: float) -> None:
        start = time.monotonic()
        while True:
            m = parse_metrics((await client.get("/metrics")).text)
            sample = {"t_s": round(time.monotonic() - start, 1), "rss_mb": _rss_mb(self.pid),
                      "running": m.get("tandem:num_requests_running"),
                      "waiting": m.get("tandem:num_requests_waiting"),
                      "kv_usage": m.get("tandem:kv_cache_usage_perc"), **self.counts}
            self.samples.append(sample)
            rss = f"{sample['rss_mb']:8.0f}" if sample["rss_mb"] is not None else "       -"
            print(f"{sample['t_s']:7.1f} {rss} {sample['running']:7.0f} "
                  f"{sample['waiting']:7.0f} {sample['kv_usage']:8.3f} "
                  f"{self.counts['completed']:9d} {self.counts['disconnected']:9d} "
                  f"{self.counts['failed']:6d}", flush=True)
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(min(self.args.sample_interval, deadline - time.monotonic()))

    async def run(self) -> dict:
        deadline = time.monotonic() + self.args.duration
        print(f"{'t_s':>7} {'rss_mb':>8} {'running':>7} {'waiting':>7} {'kv_usage':>8} "
              f"{'completed':>9} {'cut':>9} {'failed':>6}")
        limits = httpx.Limits(max_connections=self.args.concurrency + 4)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as client:
            await asyncio.gather(self.sampler(client, deadline),
                                 *(self.client_loop(client, deadline)
                                   for _ in range(self.args.concurrency)))
            for _ in range(100):  # the server drains the hung-up requests
                final = parse_metrics((await client.get("/metrics")).text)
                if not final.get("tandem:num_requests_running") and \
                        not final.get("tandem:kv_cache_usage_perc"):
                    break
                await asyncio.sleep(0.1)
        rss = [s["rss_mb"] for s in self.samples if s["rss_mb"] is not None]
        return {"workload": "soak", "duration_s": self.args.duration,
                "concurrency": self.args.concurrency, **self.counts,
                "errors": self.errors, "final_running": final.get("tandem:num_requests_running"),
                "final_kv_usage": final.get("tandem:kv_cache_usage_perc"),
                "rss_mb_first": rss[0] if rss else None, "rss_mb_last": rss[-1] if rss else None,
                "rss_mb_max": max(rss) if rss else None, "samples": self.samples}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default=None, help="a running server (default: start one)")
    p.add_argument("--pid", type=int, default=None, help="its pid, for RSS (with --base-url)")
    p.add_argument("--model", default=None, help="model directory when starting a server")
    p.add_argument("--duration", type=float, default=480.0, help="seconds (default: 480)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--disconnect-rate", type=float, default=0.1,
                   help="fraction of streams the client cuts mid-way (default: 0.1)")
    p.add_argument("--sample-interval", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-log", default=os.devnull)
    args = p.parse_args()
    proc = None
    if args.base_url:
        url, pid = args.base_url.rstrip("/"), args.pid
    else:
        proc, url = start_server(args.model, "", args.server_log)
        pid = proc.pid
    try:
        result = asyncio.run(Soak(args, url, pid).run())
    finally:
        if proc is not None:
            stop_server(proc)
    ok = (result["failed"] == 0 and not result["final_running"]
          and not result["final_kv_usage"])
    print(f"{'PASS' if ok else 'FAIL'}: {result['completed']} completed, "
          f"{result['disconnected']} cut by the client, {result['failed']} failed; final KV "
          f"usage {result['final_kv_usage']}, RSS {result['rss_mb_first']} -> "
          f"{result['rss_mb_last']} MB (max {result['rss_mb_max']})")
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
