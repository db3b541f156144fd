"""`tandem bench serve`: load an OpenAI-compatible server and measure it from the client.

    specs (datasets.py) -> arrival schedule -> one asyncio loop of aiohttp requests, at most
    --max-concurrency in flight -> one RequestRecord each -> summarize -> table + JSON line

Per request, from the client's clock: TTFT (send -> first streamed token), ITL (every gap
between streamed chunks that carry text), TPOT ((E2E - TTFT) / (output tokens - 1)) and E2E.
Output tokens come from the stream's final `usage` (the server's count), else from the
chunks. Goodput counts requests that meet every --goodput bound, per second.

Arrivals: --request-rate inf sends everything at once (then --max-concurrency paces it);
a finite rate draws gaps from a gamma distribution of shape --burstiness (1: Poisson,
below 1: burstier), or fixed gaps with --constant-rate. The client stays off the hot path:
bodies are serialized beforehand and token counts come from the server; it sustains
thousands of tiny requests per second (tests/e2e/test_bench_serve.py).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from tandem.bench.datasets import RequestSpec

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    start_s: float  # when it was sent, seconds since the run began
    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def arrival_gaps(n: int, rate: float, burstiness: float, constant: bool,
                 seed: int) -> list[float]:
    """Seconds to wait before each request (the first goes at once)."""
    if math.isinf(rate):
        return [0.0] * n
    if constant:
        return [0.0] + [1.0 / rate] * (n - 1)
    rng = random.Random(seed)
    # Gamma(shape k, scale 1/(k rate)) has mean 1/rate; k = 1 is the exponential (Poisson).
    return [0.0] + [rng.gammavariate(burstiness, 1.0 / (burstiness * rate))
                    for _ in range(n - 1)]


async def _one(session: aiohttp.ClientSession, url: str, spec: RequestSpec, t0: float,
               timeout: aiohttp.ClientTimeout) -> RequestRecord:
    start = time.perf_counter()
    rec = RequestRecord(start - t0, spec.prompt_tokens)
    last = None
    try:
        async with session.post(url + spec.path, data=spec.body, timeout=timeout,
                                headers={"Content-Type": "application/json"}) as r:
            if r.status != 200:
                rec.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return rec
            chunks = 0
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    rec.error = str(event["error"].get("message"))[:200]
                    continue
                if event.get("usage"):
                    rec.output_tokens = event["usage"].get("completion_tokens", 0)
                    rec.prompt_tokens = event["usage"].get("prompt_tokens", rec.prompt_tokens)
                if any(_text(c) for c in event.get("choices", ())):
                    now = time.perf_counter()
                    if last is None:
                        rec.ttft_s = now - start
                    else:
                        rec.itl_s.append(now - last)
                    last = now
                    chunks += 1
            rec.output_tokens = rec.output_tokens or chunks
            rec.e2e_s = time.perf_counter() - start
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:200]
    return rec


def _text(choice: dict) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def run_load(url: str, specs: list[RequestSpec], gaps: list[float],
                   max_concurrency: int | None, timeout_s: float = 600.0,
                   on_done: Callable[[RequestRecord], None] | None = None,
                   deadline_s: float | None = None) -> tuple[list[RequestRecord], float]:
    """Send `specs` on the schedule `gaps`, at most `max_concurrency` in flight, and none
    after `deadline_s`; returns the records of what was sent (in order) and the wall time
    from the first send to the last end."""
    limit = max_concurrency or len(specs)
    sem = asyncio.Semaphore(limit)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=limit + 1, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()

        async def run(spec: RequestSpec) -> RequestRecord:
            async with sem:
                rec = await _one(session, url, spec, t0, timeout)
            if on_done is not None:
                on_done(rec)
            return rec

        tasks = []
        next_at = t0
        for spec, gap in zip(specs, gaps):
            next_at += gap
            if deadline_s is not None and next_at - t0 >= deadline_s:
                break
            while deadline_s is not None and sem.locked():  # no backlog past the deadline
                if time.perf_counter() - t0 >= deadline_s:
                    break
                await asyncio.sleep(0.001)
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(run(spec)))
        records = await asyncio.gather(*tasks)
    return list(records), time.perf_counter() - t0


# ---- summary -------------------------------------------------------------------------------
def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 0.5, "tpot": 0.05} (milliseconds in, seconds out)."""
    bounds = {}
    for item in items:
        name, _, ms = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not ms:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        bounds[name] = float(ms) / 1000.0
    return bounds


def meets(rec: RequestRecord, bounds: dict[str, float]) -> bool:
    """Whether a finished request met every latency bound (a missing TPOT, for a request
    of one output token, meets any TPOT bound)."""
    if not rec.ok:
        return False
    values = {"ttft": rec.ttft_s, "tpot": rec.tpot_s, "e2el": rec.e2e_s}
    return all((values[k] is None and k == "tpot") or (values[k] is not None and values[k] <= b)
               for k, b in bounds.items())


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, **{f"p{p}": None for p in PERCENTILES[1:]},
                "max": None}
    ordered = sorted(values)

    def pct(p: float) -> float:  # linear interpolation between closest ranks
        k = (len(ordered) - 1) * p / 100
        lo, hi = math.floor(k), math.ceil(k)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"mean": statistics.fmean(ordered), "median": pct(50),
            **{f"p{p}": pct(p) for p in PERCENTILES[1:]}, "max": ordered[-1]}


def summarize(records: list[RequestRecord], duration_s: float,
              bounds: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = sum(meets(r, bounds) for r in ok)
    errors = [r.error for r in records if r.error][:5]
    return {
        "completed": len(ok), "failed": len(records) - len(ok), "first_errors": errors,
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s,
        "input_throughput": in_tokens / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "goodput": good / duration_s if bounds else None,
        "goodput_bounds_ms": {k: v * 1000 for k, v in bounds.items()},
        "ttft_s": _stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": _stats([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_s": _stats([g for r in ok for g in r.itl_s]),
        "e2el_s": _stats([r.e2e_s for r in ok]),
        "by_prompt_tokens": _by_prompt_tokens(ok, bounds),
    }


def _by_prompt_tokens(ok: list[RequestRecord], bounds: dict[str, float]
                      ) -> dict[str, dict[str, Any]] | None:
    """TTFT, ITL and goodput per prompt length, when a few lengths make the workload (the
    mixed dataset: short requests among long ones); else None."""
    lengths = sorted({r.prompt_tokens for r in ok})
    if not 2 <= len(lengths) <= 4:
        return None
    out = {}
    for n in lengths:
        group = [r for r in ok if r.prompt_tokens == n]
        out[str(n)] = {"completed": len(group),
                       "ttft_s": _stats([r.ttft_s for r in group if r.ttft_s is not None]),
                       "itl_s": _stats([g for r in group for g in r.itl_s]),
                       "good": sum(meets(r, bounds) for r in group) if bounds else None}
    return out


def record_dicts(records: list[RequestRecord]) -> list[dict]:
    return [{**asdict(r), "tpot_s": r.tpot_s} for r in records]


def load_result(path: str) -> dict[str, Any]:
    """A saved result (`--save-result`, a sweep point), plain or gzipped JSON."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def table(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = [
        ("completed / failed", f"{summary['completed']} / {summary['failed']}"),
        ("duration (s)", summary["duration_s"]),
        ("request throughput (req/s)", summary["request_throughput"]),
        ("output throughput (tok/s)", summary["output_throughput"]),
        ("total throughput (tok/s)", summary["total_token_throughput"])]
    if summary["goodput"] is not None:
        rows.append((f"goodput (req/s, {summary['goodput_bounds_ms']} ms)", summary["goodput"]))
    for name in ("ttft_s", "tpot_s", "itl_s", "e2el_s"):
        s = summary[name]
        if s["mean"] is not None:
            rows.append((f"{name[:-2].upper()} ms mean / p50 / p90 / p99 / max",
                         " / ".join(f"{1000 * s[k]:.2f}" for k in
                                    ("mean", "median", "p90", "p99", "max"))))
    for n, g in (summary.get("by_prompt_tokens") or {}).items():
        if g["ttft_s"]["mean"] is not None and g["itl_s"]["mean"] is not None:
            rows.append((f"{n}-token prompts ({g['completed']}): TTFT p50 / p99, ITL p99 ms",
                         f"{1000 * g['ttft_s']['median']:.2f} / {1000 * g['ttft_s']['p99']:.2f}"
                         f", {1000 * g['itl_s']['p99']:.2f}"))
    return rows
