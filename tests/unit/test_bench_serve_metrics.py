"""`bench serve` arithmetic on synthetic records: percentiles, TPOT, goodput, arrivals."""

from __future__ import annotations

import math
import statistics

import pytest

from tandem.bench.serve import RequestRecord, arrival_gaps, meets, parse_goodput, summarize


def _rec(ttft: float, e2e: float, out: int, error: str | None = None) -> RequestRecord:
    return RequestRecord(start_s=0.0, prompt_tokens=10, output_tokens=out, ttft_s=ttft,
                         e2e_s=None if error else e2e, itl_s=[0.01] * max(0, out - 1),
                         error=error)


def test_tpot_excludes_the_first_token():
    assert _rec(0.5, 1.5, 11).tpot_s == pytest.approx(0.1)  # (1.5 - 0.5) / 10
    assert _rec(0.5, 0.5, 1).tpot_s is None


def test_goodput_counts_requests_meeting_every_bound_per_second():
    records = [_rec(0.1, 1.1, 11),  # tpot 0.1: fails tpot:50
               _rec(0.1, 0.6, 11),  # tpot 0.05: meets
               _rec(0.6, 1.0, 9),  # ttft 0.6: fails ttft:500
               _rec(0.2, 0.2, 1),  # one token: no tpot, meets
               _rec(0.1, 0.0, 5, error="HTTP 500")]
    bounds = parse_goodput(["ttft:500", "tpot:50"])
    assert bounds == {"ttft": 0.5, "tpot": 0.05}
    assert [meets(r, bounds) for r in records] == [False, True, False, True, False]
    s = summarize(records, 2.0, bounds)
    assert s["goodput"] == 1.0  # 2 good requests / 2 s
    assert (s["completed"], s["failed"]) == (4, 1) and s["first_errors"] == ["HTTP 500"]
    assert s["output_throughput"] == (11 + 11 + 9 + 1) / 2.0
    assert s["ttft_s"]["max"] == 0.6 and s["ttft_s"]["median"] == pytest.approx(0.15)
    assert summarize(records, 2.0, {})["goodput"] is None
    assert meets(records[0], parse_goodput(["e2el:1200"]))
    with pytest.raises(ValueError, match="goodput"):
        parse_goodput(["latency:5"])


def test_percentiles_interpolate():
    recs = [_rec(t / 100, 1.0, 2) for t in range(1, 101)]  # ttft 0.01 .. 1.00
    s = summarize(recs, 1.0, {})["ttft_s"]
    assert s["p90"] == pytest.approx(0.901) and s["p99"] == pytest.approx(0.9901)
    assert s["mean"] == pytest.approx(0.505)


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrivals_have_the_asked_rate_and_spread(burstiness):
    gaps = arrival_gaps(20000, 50.0, burstiness, False, seed=1)
    assert gaps[0] == 0.0
    mean = statistics.fmean(gaps[1:])
    cv = statistics.pstdev(gaps[1:]) / mean  # coefficient of variation = 1 / sqrt(shape)
    assert mean == pytest.approx(1 / 50, rel=0.05)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_constant_and_infinite_rates():
    assert arrival_gaps(4, 2.0, 1.0, True, 0) == [0.0, 0.5, 0.5, 0.5]
    assert arrival_gaps(3, math.inf, 1.0, False, 0) == [0.0, 0.0, 0.0]
