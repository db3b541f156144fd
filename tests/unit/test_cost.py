"""`tandem cost` arithmetic against hand-computed cases."""

from __future__ import annotations

import pytest

from tandem.cost.model import (HOURS_PER_MONTH, SECONDS_PER_MONTH, Capacity, Signals, Traffic,
                               api_monthly, break_even_tokens, operating_point,
                               self_hosted_monthly, servers_needed)

# One server: 1000 output tok/s, 3000 tok/s in all, 2 GPUs at $2/GPU-hour = $4/hour.
CAP = Capacity(total_tokens_per_s=3000.0, output_tokens_per_s=1000.0, num_gpus=2,
               usd_per_gpu_hour=2.0)


def test_cost_per_million_tokens():
    # $4/h over 3.6M output tokens/h -> $1.111 per 1M output tokens; 10.8M tokens/h -> $0.370
    assert CAP.usd_per_m_output() == pytest.approx(4 / 3.6)
    assert CAP.usd_per_m_tokens() == pytest.approx(4 / 10.8)
    assert CAP.usd_per_m_input() == pytest.approx(4 / 7.2)  # 2000 input tok/s


def test_peak_provisioning_and_utilization():
    # 3000 tok/s x 0.5 utilization = 1500 tok/s per server. A mean of 1000 tok/s with a
    # peak-to-mean of 2 peaks at 2000 tok/s -> 2 servers; at utilization 1 -> 1 server.
    traffic = Traffic(1000.0 * SECONDS_PER_MONTH, 0.6, 0.1, peak_to_mean=2.0)
    assert servers_needed(traffic, CAP, 0.5) == 2
    assert servers_needed(traffic, CAP, 1.0) == 1
    assert servers_needed(Traffic(0.0, 0.6, 0.1), CAP, 0.5) == 0
    # 2 servers x $4/h x 730 h + $1000 operations
    assert self_hosted_monthly(traffic, CAP, 0.5, 1000.0) == pytest.approx(
        2 * 4 * HOURS_PER_MONTH + 1000)
    with pytest.raises(ValueError, match="utilization"):
        servers_needed(traffic, CAP, 1.5)


def test_api_monthly_by_token_kind():
    # 1e9 tokens: 600M input at $1, 100M cached at $0.5, 300M output at $4 per million
    traffic = Traffic(1e9, input_share=0.6, cached_share=0.1)
    assert api_monthly(traffic, 1.0, 0.5, 4.0) == pytest.approx(600 + 50 + 1200)
    with pytest.raises(ValueError, match="share"):
        Traffic(1e9, 0.8, 0.3)


def test_break_even_volume():
    # API: $1.85 per million of this mix (see above). Self-hosted: one server carries
    # 3000 x 1.0 x SECONDS_PER_MONTH / 1.0 tokens a month for $2920 + $0 -> break-even at
    # 2920 / 1.85e-6 = 1.578e9 tokens/month, inside the first server's step.
    traffic = Traffic(1e9, 0.6, 0.1, peak_to_mean=1.0)
    be = break_even_tokens(traffic, CAP, 1.0, 0.0, (1.0, 0.5, 4.0))
    assert be == pytest.approx(4 * HOURS_PER_MONTH / 1.85e-6)
    assert api_monthly(Traffic(be, 0.6, 0.1), 1.0, 0.5, 4.0) == pytest.approx(
        self_hosted_monthly(Traffic(be, 0.6, 0.1, 1.0), CAP, 1.0, 0.0))
    # An API so cheap that a full server's traffic costs less there: never.
    assert break_even_tokens(traffic, CAP, 1.0, 0.0, (0.01, 0.01, 0.01)) is None
    # With operations cost the crossover moves to the volume that pays for it too.
    be_ops = break_even_tokens(traffic, CAP, 1.0, 1000.0, (1.0, 0.5, 4.0))
    assert be_ops == pytest.approx((4 * HOURS_PER_MONTH + 1000) / 1.85e-6)


def _point(name, out, ttft90, tpot90, failed=0):
    return {"point": name, "output_throughput": out, "total_token_throughput": 3 * out,
            "failed": failed, "ttft_s": {"p90": ttft90}, "tpot_s": {"p90": tpot90}}


def test_operating_point_is_the_best_that_meets_the_target():
    points = [_point("c1", 100, 0.05, 0.005), _point("c64", 5000, 0.4, 0.03),
              _point("c512", 8000, 2.0, 0.07), _point("bad", 9000, 0.1, 0.01, failed=3)]
    assert operating_point(points, 1.0, 0.05)[0]["point"] == "c64"
    assert operating_point(points, None, None)[0]["point"] == "bad"  # a peak, and says so
    with pytest.raises(ValueError, match="target"):
        operating_point(points, 0.01, None)


def test_verdicts():
    assert Signals(False, None, None, True).verdict(False).startswith("self-host: the data")
    assert Signals(True, None, None, False).verdict(True).startswith("self-host: cheaper")
    assert Signals(True, None, None, False).verdict(False).startswith("buy")
    assert Signals(False, None, None, False).verdict(True) == \
        "buy (use the API): the spend is too small to matter"
    assert Signals(True, True, True, False).verdict(False).startswith("consider self-hosting")
