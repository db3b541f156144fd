"""`Scheduler`: decides, each step, which requests compute how many tokens, and applies the
runner's sampled tokens afterwards.

Request state is counters, not phases: `num_computed_tokens` catches up with `num_tokens`.
Prefill, chunked prefill, prefix-cache hits, decode and recompute after preemption all
reduce to one rule: schedule the difference, within the step's token budget.

    schedule():  1. RUNNING requests, in admission order: min(difference, budget) tokens each.
                    Out of blocks -> preempt the most recently admitted running request
                    (free its blocks, num_computed_tokens = 0, front of the waiting queue).
                 2. If nothing was preempted: admit WAITING requests (FIFO, preempted ones
                    at the front) while budget and max_num_seqs allow, after a prefix-cache
                    lookup. Out of blocks -> stop admitting (never preempt for a newcomer).
    update():    append sampled tokens, check stop conditions, free finished requests,
                 register newly full blocks in the prefix cache.

`num_computed_tokens` is advanced when a step is scheduled (the runner computes those
tokens before `update` runs); `ScheduledSeq.start_pos` is the value before.

The plan is a message (outputs.py): it names requests by id and carries only what the
runner does not hold yet (`Request.num_sent_tokens`, `num_sent_blocks` track that). The
scheduler remembers each plan's live requests by `step_id` until its `update`.

Async scheduling (one step ahead): the engine may call `schedule` for step N+1 before
`update` for step N. A request whose token step N is sampling counts it in
`num_inflight_tokens`, so N+1 can already decode it (`ScheduledSeq.inflight_input`; the
runner takes the id from N's device output). A request whose in-flight token will end it
by length is not scheduled again; one that stops on EOS or a stop string wastes one row of
N+1, which `update` skips. Requests preempted meanwhile still get step N's token.

Capacity guard: a request whose tokens need more blocks than the whole pool could never run.
`add_request` raises ValueError for such a prompt, and `update` finishes a request with
LENGTH once its tokens reach that size. So a lone request always fits, and the engine
cannot hang on one.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from tandem.config import CacheConfig, SchedulerConfig
from tandem.kv_cache import KVCacheManager
from tandem.outputs import NewRequestData, ScheduledSeq, StepPlan, StepResult
from tandem.request import FinishReason, Request, RequestStatus
from tandem.spec_decode.switch import SpecSwitch


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """A snapshot for metrics and logs."""

    num_running: int
    num_waiting: int  # preempted requests included
    num_kv_blocks_used: int  # blocks held by live requests (ref_cnt > 0)
    num_kv_blocks_total: int
    kv_cache_usage: float  # num_kv_blocks_used / num_kv_blocks_total
    prefix_cache_queries: int  # cumulative prompt tokens looked up (first admission only)
    prefix_cache_hits: int  # cumulative prompt tokens served from the prefix cache
    num_preemptions: int  # cumulative


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache_config: CacheConfig,
                 num_blocks: int) -> None:
        self.config = config
        self.block_size = cache_config.block_size
        self.kv = KVCacheManager(num_blocks, cache_config.block_size,
                                 cache_config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()  # FIFO; preempted requests re-enter at the front
        self.running: list[Request] = []  # admission order: the last one is preempted first
        self.requests: dict[str, Request] = {}  # every live (waiting or running) request
        self._awaiting_kv: dict[str, None] = {}  # WAITING_FOR_KV ids, in arrival order
        self._finished_ids: list[str] = []  # finished since the last plan, for the runner
        self.num_preemptions = 0
        self._step_id = 0
        # Speculative decoding: how many drafts each decode verifies (spec_decode/switch.py);
        # set by the engine once the step costs are profiled. None: speculation off.
        self.spec_switch: SpecSwitch | None = None
        self._spec_k: dict[str, int] = {}  # this schedule's choice per request
        self._spec_propose = self._spec_proposed = 0
        # step_id -> the live requests of that plan's seqs (aligned), until its update
        self._planned: dict[int, list[Request]] = {}

    # ---- intake -------------------------------------------------------------------------

    def add_request(self, request: Request, awaiting_kv: bool = False) -> None:
        """Queue a request (validated by the engine). Raises ValueError if its prompt needs
        more KV blocks than the pool has, or its id is already live.

        awaiting_kv (disaggregation): its prompt's KV is on its way from a prefill engine;
        it waits aside, never in front of other admissions, until `kv_arrived` (when the
        blocks are in the prefix cache, or the transfer failed and it prefills here)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already live")
        if not self._fits_in_pool(request.num_tokens):
            raise ValueError(
                f"request {request.request_id!r}: {request.num_tokens} tokens need more than "
                f"the {self.kv.num_blocks} KV blocks of {self.block_size} tokens in the pool")
        self.requests[request.request_id] = request
        if awaiting_kv:
            request.status = RequestStatus.WAITING_FOR_KV
            self._awaiting_kv[request.request_id] = None
            return
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def kv_arrived(self, request_id: str) -> None:
        """A request awaiting KV joins the waiting queue (no-op for any other id)."""
        request = self.requests.get(request_id)
        if request is not None and request.status is RequestStatus.WAITING_FOR_KV:
            request.status = RequestStatus.WAITING
            self.waiting.append(request)
            del self._awaiting_kv[request_id]

    def awaiting_kv(self) -> list[str]:
        """The ids of the requests waiting for KV (kept aside: no scan of every request
        on each step)."""
        return list(self._awaiting_kv)

    def _fits_in_pool(self, num_tokens: int) -> bool:
        return -(-num_tokens // self.block_size) <= self.kv.num_blocks

    # ---- schedule -----------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        self._spec_proposed = self._spec_propose  # what the last step asked the proposer
        if self.spec_switch is not None:
            # Every running request, prefilling ones included: they decode next, and the
            # guesses proposed after this step are for the batch they will decode in.
            other = sum(r.num_tokens - r.num_computed_tokens - 1 for r in self.running
                        if r.num_computed_tokens < r.num_tokens - 1)
            self._spec_k, self._spec_propose = self.spec_switch.choose(
                [r.request_id for r in self.running], other)
        scheduled: list[tuple[ScheduledSeq, Request]] = []
        new: list[NewRequestData] = []  # requests the runner sees for the first time
        preempted: list[Request] = []

        # 1. Running requests: decodes and ongoing chunked prefills.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_inflight_tokens and self._inflight_token_is_last(request):
                i += 1  # its in-flight token ends it; update will finish it
                continue
            num_new = min(request.num_tokens + request.num_inflight_tokens
                          - request.num_computed_tokens, budget)
            assert num_new >= 1, f"running request {request.request_id} has nothing to compute"
            spec = self._drafts_to_verify(request, budget - num_new)
            num_new += len(spec)
            while not self.kv.allocate_slots(request, num_new):
                if spec:  # out of blocks: decode plainly before preempting anyone for drafts
                    num_new -= len(spec)
                    spec = []
                    continue
                victim = self.running.pop()  # most recently admitted; never one scheduled above
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append(self._schedule_seq(request, request.num_computed_tokens,
                                                    num_new, new, spec))
                budget -= num_new
                i += 1

        # 2. Waiting requests, unless this step already had to preempt (they would only
        # take blocks back from the requests just preempted to make room).
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            assert not request.num_inflight_tokens, "admitted before its token arrived"
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            if not self.kv.allocate_slots(request, num_new, hit_blocks):
                break
            self.waiting.popleft()
            if request.num_cached_tokens == -1:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(self._schedule_seq(request, num_hit, num_new, new))
            budget -= num_new

        if self.spec_switch is not None and len(self.running) > len(self._spec_k):
            # Requests admitted this step decode soon: guess for them too if it pays at
            # the batch they will decode in, beside the prefill work still pending then
            # (while a wave of prompts is being admitted, speculation rarely pays, and a
            # step that proposes is not pipelined with the next).
            pending = sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)
            pending += sum(r.num_tokens - r.num_computed_tokens - 1 for r in self.running
                           if r.num_computed_tokens < r.num_tokens - 1)
            self._spec_propose = max(self._spec_propose, self.spec_switch.best_k(
                [r.request_id for r in self.running],
                min(pending, self.config.max_num_batched_tokens))[0])
        # Decodes (one token, or one and the drafts it verifies) first, then longer chunks;
        # stable, so within each group running requests keep admission order, ahead of
        # newly admitted ones.
        decode = [e[0].num_new_tokens == 1 or bool(e[0].spec_token_ids) for e in scheduled]
        order = [e for e, d in zip(scheduled, decode) if d]
        order += [e for e, d in zip(scheduled, decode) if not d]
        finished_ids, self._finished_ids = self._finished_ids, []
        return self._register(
            [seq for seq, _ in order], [r for _, r in order],
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            new_requests=new, finished_request_ids=finished_ids,
            preempted_request_ids=[r.request_id for r in preempted],
            num_spec_tokens=self._spec_propose)

    def _register(self, seqs: list[ScheduledSeq], requests: list[Request], **fields
                  ) -> StepPlan:
        self._step_id += 1
        self._planned[self._step_id] = requests
        return StepPlan(seqs=seqs, step_id=self._step_id, **fields)

    def requests_of(self, plan: StepPlan) -> list[Request]:
        """The live requests of a plan's seqs (aligned), until its `update` (or `discard`)."""
        return self._planned[plan.step_id]

    def discard(self, plan: StepPlan) -> None:
        """Forget a plan that will never be updated (a failed step, retried in parts)."""
        self._planned.pop(plan.step_id, None)

    def retry_plan(self, plan: StepPlan, indices: list[int]) -> StepPlan:
        """A plan of some of a failed plan's seqs, to run again synchronously: inputs from
        the host (tokens that were in flight have arrived), seeded generators rebuilt.
        Seqs whose request finished meanwhile are dropped."""
        requests = self._planned[plan.step_id]
        seqs, live, news = [], [], []
        by_id = {n.request_id: n for n in plan.new_requests}
        for i in indices:
            seq, request = plan.seqs[i], requests[i]
            if request.is_finished:
                continue
            # Everything from the seq's diff on, now that the in-flight token is known.
            tokens = request.token_ids(seq.tokens_from, seq.end_pos)
            seqs.append(dataclasses.replace(seq, inflight_input=False, new_token_ids=tokens))
            live.append(request)
            if seq.request_id in by_id:
                news.append(by_id[seq.request_id])
        return self._register(seqs, live, new_requests=news, retry=True,
                              num_batched_tokens=sum(s.num_new_tokens for s in seqs))

    def _drafts_to_verify(self, request: Request, room: int) -> list[int]:
        """The guesses a decoding request verifies this step: its proposer's, cut to the
        token budget left (`room`), and to what could still be emitted (max_tokens,
        max_model_len, the pool): a step emits at most len(drafts) + 1 tokens."""
        if self.spec_switch is None:
            return []
        k = self._spec_k.get(request.request_id, 0)
        spec = request.spec_token_ids[:k]
        if request.num_computed_tokens != request.num_tokens - 1:
            return []
        if k and not spec and self._spec_proposed:
            # drafts were asked for and wanted, and the proposer had none: as good as a
            # rejected one
            self.spec_switch.observe(request.request_id, 1, 0)
        if not spec:
            return []
        params = request.sampling_params
        # Penalties, bad words and min_tokens bans depend on every earlier token of a row,
        # drafts included: such requests decode one token a step.
        if params.reads_output_tokens or len(request.output_token_ids) < params.min_tokens:
            return []
        left = room
        if params.max_tokens is not None:
            left = min(left, params.max_tokens - len(request.output_token_ids) - 1)
        if self.config.max_model_len:
            left = min(left, self.config.max_model_len - request.num_tokens - 1)
        # the capacity guard (_fits_in_pool) for the request's last emitted token
        left = min(left, self.kv.num_blocks * self.block_size - request.num_tokens)
        return spec[:max(left, 0)]

    def _schedule_seq(self, request: Request, start_pos: int, num_new: int,
                      new: list[NewRequestData], spec: list[int] | None = None
                      ) -> tuple[ScheduledSeq, Request]:
        spec = spec or []
        end = start_pos + num_new
        request.num_computed_tokens = end  # computed by the time update runs
        sample = end - len(spec) == request.num_tokens + request.num_inflight_tokens
        if request.num_sent_tokens == 0:  # the runner has never seen it
            new.append(NewRequestData(request.request_id, request.prompt_token_ids,
                                      request.sampling_params, sorted(request.eos_token_ids)))
            request.num_sent_tokens = request.num_prompt_tokens
        table = self.kv.block_table(request.request_id)
        seq = ScheduledSeq(
            request_id=request.request_id,
            start_pos=start_pos,
            num_new_tokens=num_new,
            sample=sample,
            inflight_input=end - len(spec) > request.num_tokens,
            tokens_from=request.num_sent_tokens,
            new_token_ids=request.token_ids(request.num_sent_tokens),
            blocks_from=request.num_sent_blocks,
            new_block_ids=list(table[request.num_sent_blocks:]),
            spec_token_ids=list(spec),
        )
        request.spec_token_ids = []
        request.num_sent_tokens = request.num_tokens
        request.num_sent_blocks = len(table)
        request.num_inflight_tokens += sample
        return seq, request

    def _inflight_token_is_last(self, request: Request) -> bool:
        """Whether the token being sampled for `request` will finish it by length (what
        `_stop_reason` checks once it arrives), so it needs no further step."""
        params = request.sampling_params
        num_tokens = request.num_tokens + request.num_inflight_tokens
        num_output = len(request.output_token_ids) + request.num_inflight_tokens
        return ((params.max_tokens is not None and num_output >= params.max_tokens)
                or bool(self.config.max_model_len and num_tokens >= self.config.max_model_len)
                or not self._fits_in_pool(num_tokens))

    def _preempt(self, request: Request) -> None:
        """Recompute-style preemption: drop its K/V; it re-enters as one prefill of prompt
        + output (its registered blocks may still be prefix hits then)."""
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_sent_blocks = 0  # its next plan sends a whole new block table
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    # ---- update -------------------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> list[Request]:
        """Apply one step's result. Returns the requests that got tokens or finished, each
        once, in plan order. Seqs whose request was aborted or finished since `schedule`
        are skipped; one preempted since (async scheduling) still gets its token.

        Speculation: a seq that verified k drafts emits 1..k+1 tokens, appended one at a
        time with the stop checks of each (so EOS, a stop token or max_tokens inside an
        accepted run cut it exactly where plain decoding would); the K/V of the rejected
        drafts' positions is rolled back (num_computed_tokens), so only verified tokens
        are ever computed-and-known, and only those reach the prefix cache."""
        touched: list[Request] = []
        requests = self._planned.pop(plan.step_id)
        drafts = result.draft_token_ids
        for i, (seq, request, tokens) in enumerate(zip(plan.seqs, requests,
                                                       result.sampled_token_ids,
                                                       strict=True)):
            if seq.sample:
                request.num_inflight_tokens -= 1
            if request.status is RequestStatus.FINISHED:
                continue
            end = seq.end_pos
            if seq.sample:
                if not tokens or len(tokens) > len(seq.spec_token_ids) + 1:
                    raise ValueError(f"request {request.request_id}: {len(tokens)} tokens "
                                     f"for a step verifying {len(seq.spec_token_ids)}")
                rejected = len(seq.spec_token_ids) + 1 - len(tokens)
                end -= rejected
                if seq.spec_token_ids:
                    request.num_drafted += len(seq.spec_token_ids)
                    request.num_accepted += len(tokens) - 1
                    if self.spec_switch is not None:
                        self.spec_switch.observe(request.request_id, len(seq.spec_token_ids),
                                                 len(tokens) - 1)
                    if request.status is RequestStatus.RUNNING:
                        request.num_computed_tokens -= rejected
                if request.first_token_time is None:
                    request.first_token_time = time.time()
            if request.status is RequestStatus.RUNNING:
                # Before a finish frees the blocks, so even a finishing request leaves its
                # full blocks in the cache. Only through this step's end: with async
                # scheduling num_computed_tokens already counts the next (unrun) step.
                self.kv.cache_full_blocks(request, end)
            if not seq.sample:
                continue
            for token in tokens:
                request.output_token_ids.append(token)
                reason = self._stop_reason(request, token)
                if reason is not None:
                    self._finish(request, reason)
                    break
            else:
                if drafts is not None and request.status is RequestStatus.RUNNING:
                    request.spec_token_ids = list(drafts[i])
            touched.append(request)
        return touched

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.sampling_params
        num_output = len(request.output_token_ids)
        if num_output >= params.min_tokens:
            if token in request.eos_token_ids and not params.ignore_eos:
                return FinishReason.STOP
            if token in params.stop_token_ids:
                return FinishReason.STOP
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return FinishReason.LENGTH
        # max_model_len 0: not resolved (bare test configs), no limit.
        if self.config.max_model_len and request.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        # The capacity guard: computing the new token would need more blocks than exist.
        if not self._fits_in_pool(request.num_tokens):
            return FinishReason.LENGTH
        return None

    # ---- finishing from outside ---------------------------------------------------------

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Abort waiting or running requests; their blocks are freed at once. Unknown or
        already finished ids are ignored. Returns the requests aborted."""
        out = []
        for rid in request_ids:
            request = self.finish_request(rid, FinishReason.ABORT)
            if request is not None:
                out.append(request)
        return out

    def finish_request(self, request_id: str, reason: FinishReason) -> Request | None:
        """Finish a live request for `reason` (e.g. STOP on a stop string, found by the
        engine's detokenizer). None if the id is not live."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._finish(request, reason)
        return request

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING_FOR_KV:
            del self._awaiting_kv[request.request_id]
        else:
            self.waiting.remove(request)
        self.kv.free(request)
        del self.requests[request.request_id]
        if self.spec_switch is not None:
            self.spec_switch.forget(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finish_time = time.time()
        self._finished_ids.append(request.request_id)

    # ---- introspection ------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefixes; refused (False) while any request holds blocks."""
        return self.kv.reset_prefix_cache()

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_kv_blocks_used=self.kv.pool.num_used_blocks,
            num_kv_blocks_total=self.kv.num_blocks,
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=self.kv.prefix_cache_queries,
            prefix_cache_hits=self.kv.prefix_cache_hits,
            num_preemptions=self.num_preemptions,
        )

