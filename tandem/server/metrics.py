"""Prometheus metrics (GET /metrics) and the periodic status log line, both fed by the
engine thread after every step through `AsyncEngine.on_step`.

    gauges      tandem:num_requests_running, tandem:num_requests_waiting,
                tandem:kv_cache_usage_perc (fraction of KV blocks held by live requests)
    histograms  tandem:time_to_first_token_seconds, tandem:inter_token_latency_seconds,
                tandem:e2e_request_latency_seconds
    counters    tandem:prompt_tokens_total, tandem:generation_tokens_total,
                tandem:prefix_cache_queries_total, tandem:prefix_cache_hits_total,
                tandem:num_preemptions_total,
                tandem:request_success_total{finished_reason=stop|length|abort|error},
                speculative decoding (vLLM's names): tandem:spec_decode_num_drafts_total
                (verify steps of a request), tandem:spec_decode_num_draft_tokens_total,
                tandem:spec_decode_num_accepted_tokens_total,
                tandem:spec_decode_num_accepted_tokens_per_pos_total{position=0..k-1}
                (acceptance rate = accepted / draft tokens; mean accepted length =
                1 + accepted / drafts)

The names are vLLM's after the prefix (`--metrics-prefix`, default `tandem`; `vllm` lets
dashboards made for vLLM read them). Every series carries a `model_name` label (the served
model name), as vLLM's do. Each app
gets its own CollectorRegistry (prometheus-client is thread-safe), so several servers, or
tests, in one process never collide.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tandem.engine.stats import EngineStats
from tandem.outputs import RequestOutput

logger = logging.getLogger("tandem.server")

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                50.0, 60.0, 120.0, 240.0)


@dataclass(slots=True)
class _Timing:
    last_token_time: float
    num_tokens: int


class ServerMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None,
                 prefix: str = "tandem") -> None:
        self.registry = registry or CollectorRegistry()
        self.prefix = prefix
        r = self.registry
        def one(kind, name: str, doc: str, **kw):  # a metric with this engine's label
            return kind(f"{prefix}:{name}", doc, registry=r, labelnames=["model_name"],
                        **kw).labels(model_name)

        self.running = one(Gauge, "num_requests_running", "Requests running (in a batch)")
        self.waiting = one(Gauge, "num_requests_waiting",
                           "Requests waiting (incl. preempted)")
        self.kv_usage = one(Gauge, "kv_cache_usage_perc",
                            "Fraction of KV blocks held by live requests (0 to 1)")
        self.ttft = one(Histogram, "time_to_first_token_seconds",
                        "Arrival to first token", buckets=_TTFT_BUCKETS)
        self.itl = one(Histogram, "inter_token_latency_seconds",
                       "Time between a request's successive outputs, per step",
                       buckets=_ITL_BUCKETS)
        self.e2e = one(Histogram, "e2e_request_latency_seconds",
                       "Arrival to the last token of finished (not aborted) requests",
                       buckets=_E2E_BUCKETS)
        # prometheus-client appends _total to counter names on exposition.
        self.prompt_tokens = one(Counter, "prompt_tokens", "Prompt tokens processed")
        self.generation_tokens = one(Counter, "generation_tokens", "Tokens generated")
        self.prefix_queries = one(Counter, "prefix_cache_queries",
                                  "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = one(Counter, "prefix_cache_hits",
                               "Prompt tokens found in the prefix cache")
        self.preemptions = one(Counter, "num_preemptions",
                               "Requests preempted (their KV recomputed later)")
        self.spec_drafts = one(Counter, "spec_decode_num_drafts",
                               "Speculative verify steps (one per request per step)")
        self.spec_draft_tokens = one(Counter, "spec_decode_num_draft_tokens",
                                     "Draft tokens verified")
        self.spec_accepted = one(Counter, "spec_decode_num_accepted_tokens",
                                 "Draft tokens accepted")
        self._spec_pos = Counter(f"{prefix}:spec_decode_num_accepted_tokens_per_pos", "Draft "
                                 "tokens accepted, by position in the draft", registry=r,
                                 labelnames=["model_name", "position"])
        self._model_name = model_name
        finished = Counter(f"{prefix}:request_success", "Finished requests by finish reason",
                           registry=r, labelnames=["model_name", "finished_reason"])
        self.finished = {reason: finished.labels(model_name, reason)
                         for reason in ("stop", "length", "abort", "error")}
        self._last: EngineStats | None = None
        self._timings: dict[str, _Timing] = {}  # live requests; engine thread only

    def observe(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """Engine thread, after each step (or abort)."""
        now = time.time()
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        last = self._last
        for counter, new, old in (
                (self.prompt_tokens, stats.prompt_tokens_total, last and last.prompt_tokens_total),
                (self.generation_tokens, stats.generation_tokens_total,
                 last and last.generation_tokens_total),
                (self.prefix_queries, stats.prefix_cache_queries,
                 last and last.prefix_cache_queries),
                (self.prefix_hits, stats.prefix_cache_hits, last and last.prefix_cache_hits),
                (self.preemptions, stats.num_preemptions, last and last.num_preemptions),
                (self.spec_drafts, stats.spec_verify_steps_total,
                 last and last.spec_verify_steps_total),
                (self.spec_draft_tokens, stats.spec_drafted_total,
                 last and last.spec_drafted_total),
                (self.spec_accepted, stats.spec_accepted_total,
                 last and last.spec_accepted_total)):
            if new > (old or 0):
                counter.inc(new - (old or 0))
        before = last.spec_accepted_per_position if last else ()
        for pos, n in enumerate(stats.spec_accepted_per_position):
            old_n = before[pos] if pos < len(before) else 0
            if n > old_n:
                self._spec_pos.labels(self._model_name, str(pos)).inc(n - old_n)
        self._last = stats
        for out in outputs:
            self._observe_request(out, now)

    def _observe_request(self, out: RequestOutput, now: float) -> None:
        num_tokens = sum(len(c.token_ids) for c in out.outputs)  # new ones, for a delta
        timing = self._timings.get(out.request_id)
        if timing is None:
            if num_tokens:
                first = out.metrics.first_token_time or now
                self.ttft.observe(max(0.0, first - out.metrics.arrival_time))
                self._timings[out.request_id] = _Timing(now, num_tokens)
        elif num_tokens > (0 if out.delta else timing.num_tokens):
            self.itl.observe(now - timing.last_token_time)
            timing.last_token_time = now
            timing.num_tokens = timing.num_tokens + num_tokens if out.delta else num_tokens
        if out.finished:
            self._timings.pop(out.request_id, None)
            for c in out.outputs:
                if c.finish_reason in self.finished:
                    self.finished[c.finish_reason].inc()
            if all(c.finish_reason != "abort" for c in out.outputs):
                end = out.metrics.finished_time or now
                self.e2e.observe(max(0.0, end - out.metrics.arrival_time))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StatusLogger:
    """One log line every `interval` seconds while the engine works: throughput over the
    interval, queue sizes, KV usage and the interval's prefix-cache hit rate."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._t0 = time.monotonic()
        self._s0: EngineStats | None = None

    def observe(self, stats: EngineStats) -> None:
        now = time.monotonic()
        if self._s0 is None:
            self._t0, self._s0 = now, stats
            return
        dt = now - self._t0
        if dt < self.interval:
            return
        s0 = self._s0
        queries = stats.prefix_cache_queries - s0.prefix_cache_queries
        hits = stats.prefix_cache_hits - s0.prefix_cache_hits
        logger.info(
            "prompt throughput %.1f tok/s, generation throughput %.1f tok/s, running %d, "
            "waiting %d, KV cache usage %.1f%%, prefix cache hit rate %.1f%%",
            (stats.prompt_tokens_total - s0.prompt_tokens_total) / dt,
            (stats.generation_tokens_total - s0.generation_tokens_total) / dt,
            stats.num_running, stats.num_waiting, 100 * stats.kv_cache_usage,
            100 * hits / queries if queries else 0.0)
        self._t0, self._s0 = now, stats
