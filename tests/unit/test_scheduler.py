"""Scheduler: chunked prefill, ordering, limits, prefix hits, preemption, stops, aborts."""

from __future__ import annotations

import pytest

from tandem.config import CacheConfig, SchedulerConfig
from tandem.outputs import StepPlan, StepResult
from tandem.request import FinishReason, Request, RequestStatus, SamplingParams
from tandem.scheduler import Scheduler

EOS = 2


def make_scheduler(num_blocks: int = 32, block_size: int = 4, budget: int = 64,
                   max_num_seqs: int = 8, caching: bool = True,
                   max_model_len: int = 0) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                                     max_model_len=max_model_len),
                     CacheConfig(block_size=block_size, enable_prefix_caching=caching),
                     num_blocks)


def make_request(rid: str, prompt: list[int] | int, max_tokens: int | None = 4,
                 **params) -> Request:
    if isinstance(prompt, int):
        prompt = [10 + i for i in range(prompt)]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params),
                   eos_token_ids=frozenset({EOS}))


def result_for(plan: StepPlan, token: int = 7) -> StepResult:
    n = len(plan.seqs)
    return StepResult([[token] if s.sample else [] for s in plan.seqs], [None] * n, [None] * n)


def step(sched: Scheduler, token: int = 7) -> tuple[StepPlan, list[Request]]:
    plan = sched.schedule()
    return plan, sched.update(plan, result_for(plan, token))


def shape(plan: StepPlan) -> list[tuple[str, int, int, bool]]:
    return [(s.request_id, s.start_pos, s.num_new_tokens, s.sample) for s in plan.seqs]


def test_chunked_prefill_under_a_small_budget():
    sched = make_scheduler(budget=4)
    a = make_request("a", 10, max_tokens=2)
    sched.add_request(a)
    plans = [shape(step(sched)[0]) for _ in range(5)]
    assert plans == [[("a", 0, 4, False)], [("a", 4, 4, False)], [("a", 8, 2, True)],
                     [("a", 10, 1, True)], []]
    assert a.output_token_ids == [7, 7] and a.finish_reason is FinishReason.LENGTH


def test_decodes_first_then_prefill_chunks():
    sched = make_scheduler(budget=8, caching=False)
    sched.add_request(make_request("a", 3))
    sched.add_request(make_request("b", 12))
    assert shape(step(sched)[0]) == [("a", 0, 3, True), ("b", 0, 5, False)]
    sched.add_request(make_request("c", 6))
    # b's ongoing chunk is scheduled before a's decode but runs after it; c gets the rest.
    assert shape(step(sched)[0]) == [("a", 3, 1, True), ("b", 5, 7, True)]
    assert shape(step(sched)[0]) == [("a", 4, 1, True), ("b", 12, 1, True), ("c", 0, 6, True)]


def test_plan_fields_and_block_tables():
    sched = make_scheduler(block_size=4, budget=64)
    a = make_request("a", 9)
    sched.add_request(a)
    plan = sched.schedule()
    (seq,) = plan.seqs
    assert plan.num_batched_tokens == 9 and a.num_computed_tokens == 9
    # The first plan sends the request whole, and its block table from index 0.
    (new,) = plan.new_requests
    assert new.request_id == "a" and new.prompt_token_ids == a.prompt_token_ids
    assert seq.blocks_from == 0 and seq.new_block_ids == sched.kv.block_table("a")
    assert len(seq.new_block_ids) == 3
    assert seq.new_block_ids is not sched.kv.block_table("a")  # a copy
    assert seq.tokens_from == 9 and seq.new_token_ids == []
    sched.update(plan, result_for(plan, token=5))
    # Later plans carry only what changed: the sampled token; then one new block.
    plan = sched.schedule()
    (seq,) = plan.seqs
    assert plan.new_requests == [] and (seq.tokens_from, seq.new_token_ids) == (9, [5])
    assert (seq.blocks_from, seq.new_block_ids) == (3, [])
    sched.update(plan, result_for(plan, token=6))  # 11 tokens
    plan = sched.schedule()
    sched.update(plan, result_for(plan, token=7))  # 12 tokens
    (seq,) = sched.schedule().seqs  # computes position 11, the last of block 2
    assert (seq.tokens_from, seq.new_token_ids) == (11, [7]) and seq.new_block_ids == []


def test_max_num_seqs_limits_admission():
    sched = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        sched.add_request(make_request(rid, 3))
    plan, _ = step(sched)
    assert [s.request_id for s in plan.seqs] == ["a", "b"]
    assert (sched.num_running, sched.num_waiting) == (2, 1)


def test_prefix_hit_through_the_scheduler():
    sched = make_scheduler(block_size=4)
    prompt = list(range(20, 33))  # 13 tokens: 3 full blocks
    a = make_request("a", prompt, max_tokens=1)
    sched.add_request(a)
    step(sched)
    assert a.is_finished and a.num_cached_tokens == 0
    b = make_request("b", prompt + [5], max_tokens=1)
    sched.add_request(b)
    plan, _ = step(sched)
    assert shape(plan) == [("b", 12, 2, True)] and b.num_cached_tokens == 12
    s = sched.stats()
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (13 + 14, 12)
    assert s.num_kv_blocks_used == 0 and s.kv_cache_usage == 0.0


def test_preemption_takes_the_most_recently_admitted_and_recomputes():
    # 6 blocks of 2 tokens; three 4-token prompts fill 2 blocks each; each first decode
    # needs a third block.
    sched = make_scheduler(num_blocks=6, block_size=2, budget=64, caching=False)
    reqs = [make_request(rid, 4, max_tokens=4) for rid in "abc"]
    for r in reqs:
        sched.add_request(r)
    plan, _ = step(sched)
    assert len(plan.seqs) == 3 and sched.kv.num_free_blocks == 0
    plan, _ = step(sched)  # a needs a block: c (admitted last) goes; b takes one it freed
    assert plan.preempted_request_ids == ["c"]
    assert shape(plan) == [("a", 4, 1, True), ("b", 4, 1, True)]
    c = reqs[2]
    assert c.status is RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and sched.waiting[0] is c
    assert c.output_token_ids == [7]  # outputs survive; they are recomputed as prompt
    finished, recomputed = [], False
    for _ in range(50):
        if not sched.has_unfinished_requests():
            break
        plan, touched = step(sched)
        if any(s.request_id == c.request_id and s.start_pos == 0 for s in plan.seqs):
            assert shape(plan)[-1] == ("c", 0, 5, True)  # prompt + 1 output in one prefill
            recomputed = True
        finished += [r for r in touched if r.is_finished]
    assert recomputed
    assert sorted(r.request_id for r in finished) == ["a", "b", "c"]
    assert all(len(r.output_token_ids) == 4 for r in reqs)
    assert sched.stats().num_preemptions >= 1 and sched.kv.num_free_blocks == 6


def test_a_request_preempts_itself_when_it_is_the_most_recent():
    sched = make_scheduler(num_blocks=3, block_size=2, budget=64, caching=False)
    a, b = make_request("a", 2, max_tokens=8), make_request("b", 4, max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)  # a: 1 block, b: 2 blocks, pool full
    plan, _ = step(sched)  # a needs block 2 -> b preempted; then a fits
    assert plan.preempted_request_ids == ["b"] and shape(plan) == [("a", 2, 1, True)]
    assert sched.running == [a] and list(sched.waiting) == [b]


def test_waiting_requests_do_not_preempt_running_ones():
    sched = make_scheduler(num_blocks=4, block_size=2, budget=64, caching=False)
    sched.add_request(make_request("a", 5, max_tokens=2))  # 3 blocks
    step(sched)
    sched.add_request(make_request("b", 4))  # needs 2 blocks, 1 free
    plan, _ = step(sched)
    assert shape(plan) == [("a", 5, 1, True)] and sched.num_waiting == 1
    plan, _ = step(sched)  # a finished last step: b now fits
    assert shape(plan) == [("b", 0, 4, True)] and plan.finished_request_ids == ["a"]


def test_abort_frees_everything_at_once():
    sched = make_scheduler(num_blocks=16, block_size=4)
    for rid, n in (("a", 9), ("b", 5), ("c", 30)):
        sched.add_request(make_request(rid, n))
    plan = sched.schedule()  # a and b admitted, c partially
    aborted = sched.abort_requests(["a", "c", "zzz"])
    assert [r.request_id for r in aborted] == ["a", "c"]
    assert all(r.finish_reason is FinishReason.ABORT and r.is_finished for r in aborted)
    assert sched.abort_requests(["a"]) == []  # already finished: ignored
    touched = sched.update(plan, result_for(plan))  # aborted seqs are skipped
    assert [r.request_id for r in touched] == ["b"]
    assert sched.schedule().finished_request_ids == ["a", "c"]
    sched.abort_requests(["b"])
    assert sched.kv.num_free_blocks == 16 and not sched.has_unfinished_requests()
    assert sched.stats().num_kv_blocks_used == 0


def test_finish_request_for_a_stop_string():
    sched = make_scheduler()
    a = make_request("a", 3)
    sched.add_request(a)
    step(sched)
    assert sched.finish_request("a", FinishReason.STOP) is a
    assert a.finish_reason is FinishReason.STOP and sched.finish_request("a", FinishReason.STOP) is None
    assert sched.schedule().finished_request_ids == ["a"]


@pytest.mark.parametrize("params, tokens, reason, n_out", [
    ({}, [5, EOS], FinishReason.STOP, 2),
    ({"ignore_eos": True}, [EOS, EOS, EOS, EOS], FinishReason.LENGTH, 4),
    ({"stop_token_ids": [9]}, [5, 9], FinishReason.STOP, 2),
    ({"min_tokens": 3}, [EOS, 9, EOS], FinishReason.STOP, 3),
    ({"min_tokens": 3, "stop_token_ids": [9]}, [9, 9, 9], FinishReason.STOP, 3),
    ({}, [5, 5, 5, 5], FinishReason.LENGTH, 4),
])
def test_stop_conditions(params, tokens, reason, n_out):
    sched = make_scheduler()
    a = make_request("a", 3, max_tokens=4, **params)
    sched.add_request(a)
    for tok in tokens:
        _, touched = step(sched, tok)
        assert touched == [a]
    assert a.finish_reason is reason and len(a.output_token_ids) == n_out
    assert a.first_token_time is not None and a.finish_time is not None
    assert not sched.has_unfinished_requests() and sched.kv.num_free_blocks == 32


def test_max_model_len_stops_with_length():
    sched = make_scheduler(max_model_len=6)
    a = make_request("a", 4, max_tokens=None)
    sched.add_request(a)
    step(sched)
    step(sched)
    assert a.finish_reason is FinishReason.LENGTH and a.num_tokens == 6


def test_capacity_guard():
    sched = make_scheduler(num_blocks=2, block_size=2)
    with pytest.raises(ValueError):
        sched.add_request(make_request("big", 5))  # 3 blocks > 2
    a = make_request("a", 3, max_tokens=None)
    sched.add_request(a)
    for _ in range(5):
        step(sched)
    # At 5 tokens, computing the 5th would need a third block: finished instead of hanging.
    assert a.finish_reason is FinishReason.LENGTH and a.num_tokens == 5


def test_duplicate_live_id_is_refused():
    sched = make_scheduler()
    sched.add_request(make_request("x", 3))
    with pytest.raises(ValueError):
        sched.add_request(make_request("x", 3))


def test_empty_plan_when_idle():
    sched = make_scheduler()
    plan, touched = step(sched)
    assert plan.is_empty and plan.num_batched_tokens == 0 and touched == []


def test_drafts_are_dropped_before_anyone_is_preempted_for_them():
    """A decode whose drafts need a block the pool lacks verifies none (plain decode)
    instead of preempting another running request."""
    from tandem.spec_decode.switch import SpecSwitch
    sched = make_scheduler(num_blocks=4, block_size=4, caching=False)
    sched.spec_switch = SpecSwitch(4, None)  # always verify what there is
    a, b = make_request("a", 7, max_tokens=20), make_request("b", 7, max_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    plan = sched.schedule()  # both prefills: 2 blocks each, the pool is full
    n = len(plan.seqs)
    sched.update(plan, StepResult([[7]] * n, [None] * n, [None] * n, [[1, 2, 3]] * n))
    # a is at 8 tokens (2 full blocks): its 3 drafts would need a third block
    plan = sched.schedule()
    assert shape(plan) == [("a", 7, 1, True), ("b", 7, 1, True)]
    assert all(not s.spec_token_ids for s in plan.seqs)
    assert sched.num_preemptions == 0


def test_a_request_awaiting_kv_waits_aside_without_blocking_others():
    """Disaggregation's WAITING_FOR_KV: the request is live (counted, abortable) but never
    scheduled, and admissions behind it go ahead; once its KV arrives it queues as usual."""
    sched = make_scheduler()
    a, b = make_request("a", 10), make_request("b", 6)
    sched.add_request(a, awaiting_kv=True)
    sched.add_request(b)
    assert a.status is RequestStatus.WAITING_FOR_KV and sched.awaiting_kv() == ["a"]
    plan, _ = step(sched)
    assert [s.request_id for s in plan.seqs] == ["b"] and sched.has_unfinished_requests()
    sched.kv_arrived("a")
    sched.kv_arrived("b")  # not awaiting: nothing happens
    plan, _ = step(sched)
    assert {s.request_id for s in plan.seqs} == {"a", "b"} and sched.awaiting_kv() == []
    c = make_request("c", 5)
    sched.add_request(c, awaiting_kv=True)
    assert sched.abort_requests(["c"]) == [c] and c.status is RequestStatus.FINISHED
    assert sched.awaiting_kv() == []
