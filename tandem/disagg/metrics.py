"""Prometheus series of a disaggregated server (beside server/metrics.py's, same registry).

    tandem:disagg_requests_total{route}        remote | local | fallback (a remote request
                                               whose KV did not come: prefilled locally)
    tandem:kv_transfer_bytes_total             KV bytes shipped prefill -> decode
    tandem:kv_transfer_blocks_total
    tandem:kv_transfer_seconds                 per shipped request: export and send
    tandem:kv_import_seconds                   per request: the decode worker receiving and
                                               writing the blocks into its pool
    tandem:kv_transfer_failures_total
    tandem:worker_up{role, worker}             1 while the worker's process serves
    tandem:worker_num_requests_waiting{role, worker}, ..._running{role, worker}
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tandem.engine.stats import EngineStats

_TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0)


class DisaggMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry,
                 prefix: str = "tandem") -> None:
        r, m = registry, model_name
        routes = Counter(f"{prefix}:disagg_requests", "Requests by where their prompt was "
                         "prefilled", registry=r, labelnames=["model_name", "route"])
        self.routes = {k: routes.labels(m, k) for k in ("remote", "local", "fallback")}
        self.bytes = Counter(f"{prefix}:kv_transfer_bytes", "KV bytes shipped from prefill to "
                             "decode workers", registry=r, labelnames=["model_name"]).labels(m)
        self.blocks = Counter(f"{prefix}:kv_transfer_blocks", "KV blocks shipped", registry=r,
                              labelnames=["model_name"]).labels(m)
        self.seconds = Histogram(f"{prefix}:kv_transfer_seconds", "Per request: reading its KV "
                                 "blocks on the prefill worker and sending them", registry=r,
                                 labelnames=["model_name"], buckets=_TRANSFER_BUCKETS).labels(m)
        self.import_seconds = Histogram(
            f"{prefix}:kv_import_seconds", "Per request: the decode worker receiving its KV "
            "blocks and writing them into its pool", registry=r, labelnames=["model_name"],
            buckets=_TRANSFER_BUCKETS).labels(m)
        self.failures = Counter(f"{prefix}:kv_transfer_failures", "KV transfers that failed",
                                registry=r, labelnames=["model_name"]).labels(m)
        labels = ["model_name", "role", "worker"]
        self._up = Gauge(f"{prefix}:worker_up", "1 while the worker process serves", registry=r,
                         labelnames=labels)
        self._waiting = Gauge(f"{prefix}:worker_num_requests_waiting", "Requests waiting on the "
                              "worker", registry=r, labelnames=labels)
        self._running = Gauge(f"{prefix}:worker_num_requests_running", "Requests running on the "
                              "worker", registry=r, labelnames=labels)
        self._model = m

    def worker(self, role: str, index: int, up: bool, stats: EngineStats | None = None) -> None:
        key = (self._model, role, str(index))
        self._up.labels(*key).set(1 if up else 0)
        if stats is not None:
            self._waiting.labels(*key).set(stats.num_waiting)
            self._running.labels(*key).set(stats.num_running)
