"""The speculation switch: k from the profiled step costs and each request's acceptance."""

from __future__ import annotations

from tandem.spec_decode import switch
from tandem.spec_decode.switch import SpecSwitch, StepCosts, expected_tokens

# batch-1-like: rows are nearly free up to 8 (weights read once); compute-bound past 64
FLAT = StepCosts({1: 4e-3, 8: 4.4e-3, 64: 8e-3, 256: 30e-3, 1024: 120e-3})


def test_expected_tokens():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert abs(expected_tokens(0.8, 4) - (1 + .8 + .64 + .512 + .4096)) < 1e-12


def test_costs_interpolate_and_extrapolate():
    c = StepCosts({1: 1.0, 3: 3.0, 5: 4.0})
    assert c.verify_at(2) == 2.0 and c.verify_at(4) == 3.5 and c.verify_at(7) == 5.0
    assert c.verify_at(0) == 0.0 and c.draft_at(9) == 0.0
    noisy = StepCosts({1: 0.24, 2: 0.004, 4: 0.2, 8: 0.006})  # a busy host while profiling
    assert noisy.verify == {1: 0.004, 2: 0.004, 4: 0.006, 8: 0.006}


def _observe(sw, rid, alpha, steps=20, k=4, rng=None):
    """Steps whose drafts were each accepted with chance alpha (each given the ones before
    it were)."""
    import random
    rng = rng or random.Random(0)
    for _ in range(steps):
        a = 0
        while a < k and rng.random() < alpha:
            a += 1
        sw.observe(rid, k, a)


def test_batch_one_speculates_fully_and_large_batch_turns_it_off():
    sw = SpecSwitch(4, FLAT)
    _observe(sw, "a", 0.75)
    ks, propose = sw.choose(["a"])
    assert ks == {"a": 4} and propose == 4
    many = [f"r{i}" for i in range(256)]
    for r in many:
        _observe(sw, r, 0.75)
    ks, propose = sw.choose(many)
    assert set(ks.values()) == {0} and propose == 0
    # a draft model's forwards make drafting dearer: fewer drafts at batch 1
    dear = SpecSwitch(4, StepCosts(FLAT.verify, {1: 3e-3}))
    _observe(dear, "a", 0.75)
    assert dear.choose(["a"])[0]["a"] < 4


def test_low_acceptance_stops_then_probes_and_comes_back():
    sw = SpecSwitch(4, FLAT)
    _observe(sw, "a", 0.0)
    steps = [sw.choose(["a"]) for _ in range(2 * switch.PROBE_EVERY + 1)]
    ks = [k["a"] for k, _ in steps]
    assert ks.count(1) == 2 and ks.count(0) == len(ks) - 2  # two probes
    for i, k in enumerate(ks):  # a probe verifies the draft its previous step proposed
        if k == 1:
            assert steps[i - 1][1] == 1
    _observe(sw, "a", 1.0, steps=10, k=1)  # the text turned predictable
    assert sw.choose(["a"])[0]["a"] == 4


def test_acceptance_estimate_is_per_draft():
    import random
    sw, rng, seen = SpecSwitch(4, FLAT), random.Random(1), []
    for _ in range(300):  # the running estimate, averaged over many steps
        _observe(sw, "a", 0.8, steps=1, rng=rng)
        seen.append(sw.alpha("a"))
    assert abs(sum(seen) / len(seen) - 0.8) < 0.05  # accepted / drafted would say ~0.59


def test_overhead_learned_from_step_times_favors_more_drafts():
    costs = StepCosts({1: 4e-3, 8: 8e-3})
    sw = SpecSwitch(4, costs)
    _observe(sw, "a", 0.5)
    k_before = sw.choose(["a"])[0]["a"]
    for _ in range(30):
        sw.choose(["a"])
        sw.step_time(sw._predicted + 20e-3)  # every step took 20 ms more than predicted
    assert sw.overhead > 15e-3
    assert sw.choose(["a"])[0]["a"] > k_before


def test_stopped_requests_probe_together_and_only_where_it_could_pay():
    # A step that proposes is not pipelined with the next one, so stopped requests probe on
    # one shared step per PROBE_EVERY (not each on its own clock: a batch of them would
    # propose every step) ...
    sw = SpecSwitch(4, FLAT)
    few = [f"r{i}" for i in range(4)]
    for i, r in enumerate(few):
        _observe(sw, r, 0.0)
        for _ in range(i):  # stopped at different steps
            sw.choose(few)
    proposing = [sw.choose(few)[1] > 0 for _ in range(4 * switch.PROBE_EVERY)]
    assert sum(proposing) == 4
    # ... and a batch where even acceptance at the prior would not pay never probes
    many = [f"m{i}" for i in range(256)]
    for r in many:
        _observe(sw, r, 0.0)
    assert not any(sw.choose(many)[1] for _ in range(3 * switch.PROBE_EVERY))


def test_prefill_rows_are_charged_to_the_prefill_and_proposing_pays_the_host_work():
    sw = SpecSwitch(4, FLAT)
    rids = [f"r{i}" for i in range(4)]
    for r in rids:
        _observe(sw, r, 0.75)
    assert sw.best_k(rids)[0] > 0  # four decodes alone: rows nearly free, drafts pay
    # beside a prefill the weights are read anyway: each draft row costs its share of the
    # (now linear) compute, and an accepted draft is less than a token a row
    assert sw.best_k(rids, other_rows=1024)[0] == 0
    # with async scheduling a pipelined step takes max(device, host), a proposing one
    # device + host: 3 ms of host work hidden under a 4 ms step outweighs what drafts at
    # a = 0.3 bring ...
    sw.host = 3e-3
    for _ in range(10):  # one accepted of every three tried
        sw.observe("low", 4, 1)
        sw.observe("low", 4, 0)
    assert 0.25 < sw.alpha("low") < 0.4
    assert sw.best_k(["low"])[0] == 0
    sw.host = 0.0
    assert sw.best_k(["low"])[0] > 0
    # ... while a host-bound engine (20 ms of host work a step) gains by more tokens a step
    sw.host = 20e-3
    assert sw.best_k(["r0"])[0] == 4
    # and beside a prefill, drafts still do not pay
    assert sw.best_k(rids, other_rows=1024)[0] == 0
    for _ in range(50):
        sw.host_time(1e-3)
    assert abs(sw.host - 1e-3) < 1e-4
