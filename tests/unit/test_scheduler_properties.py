"""Property tests: random add / step / abort / finish on small pools, so preemption, prefix
hits, eviction and chunking interleave. A fake runner writes each computed token id into a
simulated KV cache, so a prefix hit or a recycled block with the wrong content is caught.
In async mode each step is planned before the previous one's update (as the engine does
on CUDA), so decodes whose input token is still in flight are in the mix too.

Synchronous runs may speculate: after each update the fake proposer gives running requests
0..4 random drafts, and a seq that verifies k of them emits the accepted ones plus one token
of its own (1..k+1 tokens). The fake runner writes the drafts into the K/V too, so a
rejected draft whose slot is not recomputed, or a cached block holding one, is caught; a
cached block's hash must name a block of some request's real (verified) tokens."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from tandem.config import CacheConfig, SchedulerConfig
from tandem.kv_cache.block_manager import hash_block_tokens
from tandem.outputs import StepResult
from tandem.request import FinishReason, Request, RequestStatus, SamplingParams
from tandem.runner.request_state import apply_plan
from tandem.spec_decode.switch import SpecSwitch
from tandem.scheduler import Scheduler

EOS, STOP_ID = 0, 3
SAMPLED = [0, 1, 1, 1, 2, 2, 2, 3]  # the fake runner's (and proposer's) draws: 1 in 4 stops
BASE = [1, 2, 1, 1, 2, 2, 1, 2, 2, 2, 1, 1]  # prompts often start with a piece of this,
# so prefixes are shared; the rest comes from {1, 2}, so blocks also collide by chance
MAX_DRAIN_STEPS = 5000
MAX_DRAFTS = 4


class EveryDecodeVerifies(SpecSwitch):
    """The scheduler's speculation switch (spec_decode/switch.py) without its cost model:
    every decoding request may verify up to MAX_DRAFTS drafts."""

    def __init__(self) -> None:
        super().__init__(MAX_DRAFTS, None)

    def observe(self, rid: str, drafted: int, accepted: int) -> None:
        assert 0 <= accepted <= drafted <= MAX_DRAFTS
        super().observe(rid, drafted, accepted)


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(num_blocks=st.integers(4, 12), block_size=st.integers(2, 4),
                budget=st.integers(1, 16), max_num_seqs=st.integers(1, 4),
                caching=st.booleans(), max_model_len=st.sampled_from([0, 0, 12, 30]),
                async_mode=st.booleans(), speculate=st.booleans())
    def setup(self, num_blocks: int, block_size: int, budget: int, max_num_seqs: int,
              caching: bool, max_model_len: int, async_mode: bool, speculate: bool) -> None:
        self.sched = Scheduler(
            SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                            max_model_len=max_model_len),
            CacheConfig(block_size=block_size, enable_prefix_caching=caching), num_blocks)
        self.bs, self.num_blocks = block_size, num_blocks
        self.added: dict[str, Request] = {}
        self.finished: Counter[str] = Counter()  # from update() returns, aborts, finishes
        self.reported: Counter[str] = Counter()  # from plans' finished_request_ids
        self.kv_content: dict[int, int] = {}  # slot -> token id the fake runner wrote there
        self.runner_states: dict = {}  # request id -> RequestState, from plans alone
        self.next_id = 0
        self.async_mode = async_mode
        self.pending = None  # async: (plan, tokens) scheduled, not yet updated
        self.inflight: dict[str, int] = {}  # request id -> its token the pending step drew
        self.speculate = speculate and not async_mode  # the engine refuses async + drafts
        if self.speculate:
            self.sched.spec_switch = EveryDecodeVerifies()
        # Chained hashes of every request's real tokens (prompt + appended outputs), per
        # request, and hash -> that block's tokens: the only content the prefix cache may hold.
        self.history: dict[str, list[int]] = {}
        self.verified: dict[int, tuple[int, ...]] = {}

    # ---- operations ---------------------------------------------------------------------

    @rule(shared=st.integers(0, len(BASE)), tail=st.lists(st.integers(1, 2), max_size=6),
          max_tokens=st.one_of(st.none(), st.integers(1, 6)), ignore_eos=st.booleans(),
          min_tokens=st.integers(0, 2), prompt_logprobs=st.sampled_from([None, None, None, 1]))
    def add(self, shared: int, tail: list[int], max_tokens: int | None, ignore_eos: bool,
            min_tokens: int, prompt_logprobs: int | None) -> None:
        prompt = BASE[:shared] + tail
        if not prompt:
            return
        max_model_len = self.sched.config.max_model_len
        if max_model_len and len(prompt) >= max_model_len:
            return  # the engine refuses these before they reach the scheduler
        if max_tokens is not None:
            min_tokens = min(min_tokens, max_tokens)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos,
                                min_tokens=min_tokens, stop_token_ids=[STOP_ID],
                                prompt_logprobs=prompt_logprobs)
        request = Request(f"r{self.next_id}", prompt, params, frozenset({EOS}))
        self.next_id += 1
        try:
            self.sched.add_request(request)
        except ValueError:
            assert -(-len(prompt) // self.bs) > self.num_blocks
            return
        self.added[request.request_id] = request

    @rule(seed=st.integers(0, 2**32 - 1), num_steps=st.integers(1, 4))
    def step(self, seed: int, num_steps: int) -> None:
        rng = random.Random(seed)
        for _ in range(num_steps):
            self._step(rng)

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data(), reason=st.sampled_from([FinishReason.ABORT, FinishReason.STOP]))
    def finish_from_outside(self, data: st.DataObject, reason: FinishReason) -> None:
        """A client abort, or the engine finding a stop string."""
        rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
        if reason is FinishReason.ABORT:
            (request,) = self.sched.abort_requests([rid, "unknown"])
        else:
            request = self.sched.finish_request(rid, reason)
        assert request is not None and request.finish_reason is reason
        assert self.sched.finish_request(rid, reason) is None  # no longer live
        self.finished[rid] += 1

    def _token(self, r: Request, pos: int, spec: list[int] | None = None) -> int:
        """The token at pos: known, a draft being verified, or the in-flight one (the runner
        knows it on device)."""
        if pos < r.num_tokens:
            return r.token_at(pos)
        return spec[pos - r.num_tokens] if spec else self.inflight[r.request_id]

    @staticmethod
    def _verify(rng: random.Random, spec: list[int]) -> list[int]:
        """What verifying `spec` emits: the accepted drafts, then the target's own token,
        never the first rejected draft (lossless verification resamples away from it)."""
        accepted = rng.choice([0, len(spec), rng.randint(0, len(spec))])
        own = [t for t in SAMPLED if accepted == len(spec) or t != spec[accepted]]
        return spec[:accepted] + [rng.choice(own)]

    def _step(self, rng: random.Random) -> None:
        sched, bs = self.sched, self.bs
        offered = {r.request_id: list(r.spec_token_ids) for r in sched.running}
        plan = sched.schedule()
        reqs = sched.requests_of(plan)
        apply_plan(self.runner_states, plan)  # what a model runner would hold
        self.reported.update(plan.finished_request_ids)
        cfg = sched.config
        assert plan.num_batched_tokens == sum(s.num_new_tokens for s in plan.seqs)
        assert plan.num_batched_tokens <= cfg.max_num_batched_tokens
        assert len(sched.running) <= cfg.max_num_seqs
        assert len({id(r) for r in reqs}) == len(plan.seqs) == len(reqs)
        decode = [s.num_new_tokens == 1 or bool(s.spec_token_ids) for s in plan.seqs]
        assert decode == sorted(decode, reverse=True)  # decodes (verifying or not) first
        for rid in plan.preempted_request_ids:
            r = self.added[rid]
            assert r.status is RequestStatus.PREEMPTED and r.num_computed_tokens == 0
        for s, r in zip(plan.seqs, reqs):
            assert s.request_id == r.request_id
            assert r.status is RequestStatus.RUNNING and s.num_new_tokens >= 1
            known = r.num_tokens + r.num_inflight_tokens - s.sample  # before this plan
            spec = s.spec_token_ids
            assert r.num_computed_tokens == s.end_pos and s.end_pos - len(spec) <= known
            assert s.sample == (s.end_pos - len(spec) == known)
            assert not r.spec_token_ids  # offered drafts are verified now or dropped
            if spec:  # a decode verifying a prefix of its drafts, cut to what may be emitted
                assert self.speculate and s.sample and s.start_pos == r.num_tokens - 1
                assert offered[r.request_id][:len(spec)] == spec
                p, out = r.sampling_params, len(r.output_token_ids)
                assert out >= p.min_tokens and not p.has_penalties
                assert p.max_tokens is None or out + len(spec) + 1 <= p.max_tokens
                assert (not cfg.max_model_len
                        or r.num_tokens + len(spec) + 1 <= cfg.max_model_len)
            assert s.inflight_input == (s.end_pos - len(spec) > r.num_tokens)
            assert self.async_mode or not s.inflight_input
            # The runner's copy, built from diffs only, matches the scheduler's state.
            state = self.runner_states[r.request_id]
            table = state.block_ids
            assert table == sched.kv.block_table(r.request_id)
            assert state.token_ids == r.all_token_ids
            assert len(table) * bs >= s.end_pos
            for pos in range(s.start_pos):  # the K/V this chunk attends to is right
                slot = table[pos // bs] * bs + pos % bs
                assert self.kv_content.get(slot) == self._token(r, pos), (r.request_id, pos)
            for pos in range(s.start_pos, s.end_pos):  # never write into a shared block
                block = table[pos // bs]
                assert sched.kv.pool.ref_cnt[block] == 1
                self.kv_content[block * bs + pos % bs] = self._token(r, pos, spec)
        if plan.seqs and rng.random() < 0.05:  # an abort lands between schedule and update
            victim = rng.choice(reqs)
            assert sched.abort_requests([victim.request_id]) == [victim]
            self.finished[victim.request_id] += 1
        tokens = [(self._verify(rng, s.spec_token_ids) if s.spec_token_ids
                   else [rng.choice(SAMPLED)]) if s.sample else [] for s in plan.seqs]
        if self.async_mode:  # update the previous step now; this one stays in flight
            previous, self.pending = self.pending, (plan, tokens)
            if previous is not None:
                self._update(*previous)
            self.inflight = {s.request_id: t[0] for s, t in zip(plan.seqs, tokens)
                             if s.sample}
        else:
            drafts = None
            if self.speculate:  # the proposer's guesses for the step after this one
                drafts = [[rng.choice(SAMPLED) for _ in range(rng.randint(0, MAX_DRAFTS))]
                          for _ in plan.seqs]
            self._update(plan, tokens, drafts)

    def _update(self, plan, tokens: list[list[int]],
                drafts: list[list[int]] | None = None) -> None:
        sched, cfg, n = self.sched, self.sched.config, len(plan.seqs)
        reqs = sched.requests_of(plan)
        before = [(r.is_finished, list(r.output_token_ids)) for r in reqs]
        sampled = {id(r) for s, r in zip(plan.seqs, reqs) if s.sample}
        touched = sched.update(plan, StepResult(tokens, [None] * n, [None] * n, drafts))
        assert len({id(r) for r in touched}) == len(touched)
        for r in touched:
            assert id(r) in sampled and r.finish_reason is not FinishReason.ABORT
            if r.is_finished:
                self.finished[r.request_id] += 1
                assert not cfg.max_model_len or r.num_tokens <= cfg.max_model_len
            p = r.sampling_params
            assert p.max_tokens is None or len(r.output_token_ids) <= p.max_tokens
        for i, (s, r) in enumerate(zip(plan.seqs, reqs)):
            was_finished, old = before[i]
            if was_finished or not s.sample:
                assert r.output_token_ids == old
                continue
            # Each emitted token is appended with its own stop checks, as if decoded alone:
            # nothing after the first stop, whatever the run's length.
            kept, reason = self._expected_stop(r, old, tokens[i])
            assert r.output_token_ids == old + tokens[i][:kept], (r.request_id, tokens[i])
            assert r.finish_reason is reason
            if r.status is RequestStatus.RUNNING:
                assert r.spec_token_ids == (drafts[i] if drafts is not None else [])
                if not self.async_mode:  # rejected drafts rolled back: only the new token
                    assert r.num_computed_tokens == r.num_tokens - 1  # is left to compute

    def _expected_stop(self, r: Request, old: list[int], emitted: list[int]
                       ) -> tuple[int, FinishReason | None]:
        """How many of `emitted` plain decoding would append after `old`, and why it ends."""
        p, max_len = r.sampling_params, self.sched.config.max_model_len
        for kept, t in enumerate(emitted, 1):
            num_out = len(old) + kept
            num_tokens = r.num_prompt_tokens + num_out
            if num_out >= p.min_tokens and (t == STOP_ID or (t == EOS and not p.ignore_eos)):
                return kept, FinishReason.STOP
            if ((p.max_tokens is not None and num_out >= p.max_tokens)
                    or (max_len and num_tokens >= max_len)
                    or -(-num_tokens // self.bs) > self.num_blocks):
                return kept, FinishReason.LENGTH
        return len(emitted), None

    # ---- invariants ---------------------------------------------------------------------

    @invariant()
    def blocks_are_consistent(self) -> None:
        if not hasattr(self, "sched"):
            return
        kv, pool = self.sched.kv, self.sched.kv.pool
        holders: Counter[int] = Counter()
        for rid, r in self.sched.requests.items():
            table = kv.block_table(rid)
            assert len(set(table)) == len(table)
            holders.update(table)
            assert not r.is_finished
            if r.status is RequestStatus.RUNNING:
                assert r.num_computed_tokens < r.num_tokens + r.num_inflight_tokens
                assert r.num_inflight_tokens <= (1 if self.async_mode else 0)
                assert len(table) * self.bs >= r.num_computed_tokens
            else:
                assert r.num_computed_tokens == 0 and table == [] and not r.spec_token_ids
        assert [pool.ref_cnt[b] for b in range(self.num_blocks)] == [
            holders[b] for b in range(self.num_blocks)]
        # Blocks are shared only through the prefix cache: registered, at the same index.
        index: dict[int, int] = {}
        for rid in self.sched.requests:
            for i, b in enumerate(kv.block_table(rid)):
                assert holders[b] == 1 or (pool.block_hash[b] is not None
                                           and index.setdefault(b, i) == i)
        free = pool.free_block_ids()
        assert len(free) == len(set(free))
        assert set(free) == {b for b in range(self.num_blocks) if pool.ref_cnt[b] == 0}
        assert pool.num_used_blocks + pool.num_free_blocks == self.num_blocks
        for b in range(self.num_blocks):
            h = pool.block_hash[b]
            assert h is None or pool.get_cached_block(h) == b
        assert len(self.sched.running) + len(self.sched.waiting) == len(self.sched.requests)
        self._check_prefix_cache()

    def _check_prefix_cache(self) -> None:
        """No unverified token is ever cached: every registered block holds a block of some
        request's real tokens (hash and K/V both), and a live request's registered blocks
        are its own tokens."""
        bs, pool = self.bs, self.sched.kv.pool
        for rid, r in self.added.items():
            hashes = self.history.setdefault(rid, [])
            while (len(hashes) + 1) * bs <= r.num_tokens:
                i = len(hashes)
                block = tuple(r.token_at(p) for p in range(i * bs, (i + 1) * bs))
                hashes.append(hash_block_tokens(hashes[-1] if hashes else None, block))
                self.verified[hashes[-1]] = block
        for b, h in enumerate(pool.block_hash):
            if h is not None:
                assert h in self.verified, f"block {b} cached under an unverified hash"
                content = tuple(self.kv_content.get(b * bs + j) for j in range(bs))
                assert content == self.verified[h], f"block {b}'s K/V is not what it caches"
        for rid in self.sched.requests:
            for i, b in enumerate(self.sched.kv.block_table(rid)):
                h = pool.block_hash[b]
                assert h is None or self.history[rid][i:i + 1] == [h], (rid, i)

    def teardown(self) -> None:
        if not hasattr(self, "sched"):
            return
        rng = random.Random(0)
        for _ in range(MAX_DRAIN_STEPS):
            if not self.sched.has_unfinished_requests():
                break
            self._step(rng)
            self.blocks_are_consistent()
        if self.pending is not None:  # only finished requests can be left in it
            self._update(*self.pending)
        assert not self.sched.has_unfinished_requests(), "did not drain"
        self.reported.update(self.sched.schedule().finished_request_ids)
        assert self.finished == Counter(self.added.keys()), "each request finishes exactly once"
        assert self.reported == Counter(self.added.keys()), "each finish reaches the runner once"
        assert all(c == 0 for c in self.sched.kv.pool.ref_cnt), "leaked blocks"
        assert self.sched.stats().num_kv_blocks_used == 0


SchedulerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50,
                                              deadline=None)
TestScheduler = SchedulerMachine.TestCase


@given(st.lists(st.integers(0, 99), min_size=1, max_size=40),
       st.lists(st.integers(0, 99), max_size=40), st.data())
def test_token_ids_slices_like_all_token_ids(prompt, output, data):
    request = Request("r", prompt, SamplingParams(), output_token_ids=list(output))
    total = len(prompt) + len(output)
    start = data.draw(st.integers(0, total))
    end = data.draw(st.none() | st.integers(start, total + 3))
    assert request.token_ids(start, end) == request.all_token_ids[start:end]
