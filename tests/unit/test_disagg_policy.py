"""The disaggregation routing rule on constructed cases."""

from __future__ import annotations

import pytest

from tandem.disagg.policy import DisaggPolicy


def test_fixed_policies():
    assert DisaggPolicy("always").route(10, 0, 10**9) == "remote"
    assert DisaggPolicy("never").route(100_000, 0, 0) == "local"
    # never transferable (prompt_logprobs, n > 1): local under every policy
    for p in ("always", "never", "conditional"):
        assert DisaggPolicy(p).route(100_000, 0, 0, transferable=False) == "local"


@pytest.mark.parametrize("prompt,cached,queue,route", [
    (4096, 0, 0, "remote"),  # long and uncached
    (2047, 0, 0, "local"),  # short
    (8192, 4096, 0, "local"),  # 4096 uncached, but only half the prompt: cached enough
    (8192, 2048, 0, "remote"),  # 6144 uncached = 0.75 of it
    (10_000, 6_000, 0, "local"),  # 4000 uncached, 0.4 of it
    (4096, 0, 70_000, "local"),  # the prefill side is saturated
    (4096, 0, 65_535, "remote"),
])
def test_conditional(prompt, cached, queue, route):
    assert DisaggPolicy("conditional").route(prompt, cached, queue) == route


def test_thresholds_are_settable_and_checked():
    p = DisaggPolicy("conditional", min_remote_tokens=16, min_uncached_fraction=0.0)
    assert p.route(20, 0, 0) == "remote" and p.route(20, 10, 0) == "local"
    with pytest.raises(ValueError, match="must be one of"):
        DisaggPolicy("sometimes")
    with pytest.raises(ValueError):
        DisaggPolicy(min_uncached_fraction=1.5)
