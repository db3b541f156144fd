"""Build or buy, as arithmetic. No I/O here: cli.py reads results and prints.

    operating point   the measured `bench serve` point with the most output throughput that
                      meets the latency target (p90 TTFT and TPOT), not a peak
    self-hosted       servers = ceil(peak demand / one server's measured capacity), where
                      peak = mean x peak-to-mean / utilization (the headroom you keep);
                      monthly = servers x GPUs x $/GPU-hour x 730 h + operations
    cost per token    $/GPU-hour x GPUs / (tokens/s x 3600) at the operating point, per
                      million: what a token costs on a busy server
    API               monthly = Mtokens x price, by kind (input, cached input, output)
    break-even        the smallest monthly volume from which self-hosting costs less
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

HOURS_PER_MONTH = 730.0  # 365 x 24 / 12
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600


@dataclass(frozen=True, slots=True)
class Traffic:
    tokens_per_month: float  # input + output tokens
    input_share: float  # of all tokens, uncached input
    cached_share: float  # of all tokens, input served from a prompt cache
    peak_to_mean: float = 2.0  # busiest hour's rate over the month's mean rate

    def __post_init__(self) -> None:
        if self.tokens_per_month < 0 or self.peak_to_mean < 1:
            raise ValueError("tokens_per_month must be >= 0 and peak_to_mean >= 1")
        if not (0 <= self.input_share and 0 <= self.cached_share
                and self.input_share + self.cached_share <= 1):
            raise ValueError("input_share + cached_share must lie in [0, 1]")

    @property
    def output_share(self) -> float:
        return 1.0 - self.input_share - self.cached_share


@dataclass(frozen=True, slots=True)
class Capacity:
    """One server (num_gpus GPUs) at its operating point."""

    total_tokens_per_s: float  # input + output tokens/s it sustained
    output_tokens_per_s: float
    num_gpus: int
    usd_per_gpu_hour: float

    @property
    def usd_per_hour(self) -> float:
        return self.usd_per_gpu_hour * self.num_gpus

    def usd_per_m_output(self) -> float:
        """Self-hosted cost of a million output tokens (all GPU time charged to output)."""
        return self.usd_per_hour / (self.output_tokens_per_s * 3600) * 1e6

    def usd_per_m_input(self) -> float:
        """Self-hosted cost of a million input tokens (all GPU time charged to input)."""
        input_per_s = self.total_tokens_per_s - self.output_tokens_per_s
        return self.usd_per_hour / (input_per_s * 3600) * 1e6 if input_per_s > 0 else math.inf

    def usd_per_m_tokens(self) -> float:
        """Blended cost of a million tokens of the benchmark's input/output mix."""
        return self.usd_per_hour / (self.total_tokens_per_s * 3600) * 1e6


def servers_needed(traffic: Traffic, cap: Capacity, utilization: float) -> int:
    """Servers to carry the peak rate while running at most `utilization` of capacity.
    Capacity is in the benchmark's token mix: traffic with another mix is an estimate."""
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    if traffic.tokens_per_month == 0:
        return 0
    peak_rate = traffic.tokens_per_month / SECONDS_PER_MONTH * traffic.peak_to_mean
    return math.ceil(peak_rate / (cap.total_tokens_per_s * utilization))


def self_hosted_monthly(traffic: Traffic, cap: Capacity, utilization: float,
                        ops_usd_per_month: float) -> float:
    servers = servers_needed(traffic, cap, utilization)
    return servers * cap.usd_per_hour * HOURS_PER_MONTH + (ops_usd_per_month if servers else 0)


def api_monthly(traffic: Traffic, input_per_m: float, cached_per_m: float,
                output_per_m: float) -> float:
    m = traffic.tokens_per_month / 1e6
    return m * (traffic.input_share * input_per_m + traffic.cached_share * cached_per_m
                + traffic.output_share * output_per_m)


def break_even_tokens(traffic: Traffic, cap: Capacity, utilization: float,
                      ops_usd_per_month: float, api: tuple[float, float, float],
                      max_tokens: float = 1e15) -> float | None:
    """The smallest monthly volume (same mix and peak) from which self-hosting is cheaper
    than the API; None if it never is below max_tokens. Self-hosting rises in steps (one
    more server), so the search walks the step edges and solves within each step."""
    per_token_api = api_monthly(Traffic(1.0, traffic.input_share, traffic.cached_share,
                                        traffic.peak_to_mean), *api)
    if per_token_api <= 0:
        return None
    server_tokens = (cap.total_tokens_per_s * utilization * SECONDS_PER_MONTH
                     / traffic.peak_to_mean)  # monthly volume one server carries
    if server_tokens * per_token_api <= cap.usd_per_hour * HOURS_PER_MONTH:
        return None  # a full server's traffic costs less on the API than the server
    servers = 1
    while (servers - 1) * server_tokens < max_tokens:
        cost = servers * cap.usd_per_hour * HOURS_PER_MONTH + ops_usd_per_month
        volume = cost / per_token_api  # where the API costs as much as `servers` servers
        if volume <= servers * server_tokens:  # within this step: the crossover
            return max(volume, (servers - 1) * server_tokens)
        servers += 1
    return None


def operating_point(results: list[dict[str, Any]], ttft_slo_s: float | None,
                    tpot_slo_s: float | None) -> tuple[dict[str, Any], str]:
    """The point with the most output throughput whose p90 TTFT and TPOT meet the targets
    (and with no failed request); without targets, the best point, said to be a peak."""
    def meets(r: dict[str, Any]) -> bool:
        ttft, tpot = r["ttft_s"]["p90"], r["tpot_s"]["p90"]
        return (not r.get("failed") and (ttft_slo_s is None or (ttft or 0) <= ttft_slo_s)
                and (tpot_slo_s is None or (tpot or 0) <= tpot_slo_s))
    if ttft_slo_s is None and tpot_slo_s is None:
        return max(results, key=lambda r: r["output_throughput"]), "peak (no latency target)"
    ok = [r for r in results if meets(r)]
    if not ok:
        raise ValueError("no measured point meets the latency target; measure lower loads "
                         "or relax --ttft-slo-ms / --tpot-slo-ms")
    return max(ok, key=lambda r: r["output_throughput"]), "best point meeting the target"


@dataclass(frozen=True, slots=True)
class Signals:
    """The three reasons to self-host, and the one that overrides the money."""

    spend_is_material: bool  # the cheapest API's monthly bill is above the threshold
    latency_beats_api: bool | None  # the target is tighter than the API offers (None: unknown)
    reliability_beats_sla: bool | None  # the uptime target exceeds the vendor's SLA
    must_stay_on_prem: bool  # compliance: data may not leave

    def verdict(self, self_hosted_cheaper: bool) -> str:
        if self.must_stay_on_prem:
            return "self-host: the data must stay on premises (compliance overrides cost)"
        reasons = [name for name, on in (("the API spend is material", self.spend_is_material),
                                         ("the latency target is tighter than the API's",
                                          self.latency_beats_api),
                                         ("the reliability target exceeds the vendor SLA",
                                          self.reliability_beats_sla)) if on]
        if self_hosted_cheaper and self.spend_is_material:
            return "self-host: cheaper at this volume, and " + "; ".join(reasons)
        if reasons and not self_hosted_cheaper and len(reasons) >= 2:
            return "consider self-hosting despite the cost: " + "; ".join(reasons)
        return "buy (use the API): " + ("self-hosting is not cheaper at this volume"
                                        if not self_hosted_cheaper else
                                        "the spend is too small to matter")
