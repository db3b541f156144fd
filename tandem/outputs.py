"""The messages between stages: `StepPlan` (scheduler -> runner), `StepResult` (runner ->
scheduler) and `RequestOutput` (engine -> caller). No torch here: results carry lists.

A `StepPlan` is data a worker process can receive (executor/codec.py encodes it with
msgpack): it names requests by id and never carries scheduler objects. The runner keeps
its own state per request (runner/request_state.py), so a plan sends each request once
(`NewRequestData`) and afterwards only what changed:

    step 1   new: "a" prompt [p0..p39], params    seq "a": start 0, 32 tokens, blocks [0:]=[4 9]
    step 2                                        seq "a": start 32, 8 tokens, blocks [2:]=[11]
    step 3                                        seq "a": start 40, 1 token, tokens [40:]=[t40]

Token and block diffs say where they start (`tokens_from`, `blocks_from`), so applying one
twice is harmless (a retried step) and a preempted request's new block table simply
replaces the old one from index 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from tandem.request import SamplingParams

# {token_id: logprob} for the chosen token plus the top-N alternatives at one position
# (the runner's message; `StepResult` carries the chosen token's rank beside it).
Logprobs = dict[int, float]


class Logprob(NamedTuple):
    """One token's entry in an output's logprobs, as vLLM's `Logprob`: its log-probability,
    its 1-based rank in the whole vocabulary's distribution, and its text. A tuple, so
    outputs pickle cheaply to the server process."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# {token_id: Logprob} at one position: the chosen (or prompt) token and the top-N.
TokenLogprobs = dict[int, Logprob]


@dataclass(frozen=True, slots=True)
class NewRequestData:
    """A request the runner has not seen: sent once, in the plan of its first step."""

    request_id: str
    prompt_token_ids: list[int]  # the whole prompt (scheduler)
    sampling_params: SamplingParams  # as validated by the engine (scheduler)
    eos_token_ids: list[int]  # banned, with stop_token_ids, until min_tokens are out


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """One request's share of a step: compute tokens [start_pos, start_pos + num_new_tokens)."""

    request_id: str
    start_pos: int  # == the request's num_computed_tokens when scheduled (scheduler)
    num_new_tokens: int  # tokens to compute this step, >= 1 (scheduler)
    sample: bool  # True when this chunk reaches the end of the known tokens (scheduler)
    inflight_input: bool = False  # its last input token is the one the previous step is
    # still sampling: the runner takes it from that step's device output (async scheduling)
    tokens_from: int = 0  # position of new_token_ids[0] in the request's token sequence
    new_token_ids: list[int] = field(default_factory=list)  # tokens the runner lacks:
    # those sampled since the request's last plan (the prompt came in NewRequestData)
    blocks_from: int = 0  # index of new_block_ids[0] in the request's block table
    new_block_ids: list[int] = field(default_factory=list)  # KV block ids added since the
    # last plan (all of them, from 0, after a preemption); the table then covers end_pos
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens this step
    # verifies: the last len(spec_token_ids) of the num_new_tokens positions (speculative
    # decoding); the step samples every one of those rows plus the one before them

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_new_tokens


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What one `Engine.step` computes. Decodes come first, then prefill chunks."""

    seqs: list[ScheduledSeq]  # in execution order (scheduler)
    num_batched_tokens: int  # sum of num_new_tokens, <= max_num_batched_tokens (scheduler)
    new_requests: list[NewRequestData] = field(default_factory=list)  # first seen in seqs
    finished_request_ids: list[str] = field(default_factory=list)  # freed since the last plan;
    # the runner drops their state (scheduler)
    preempted_request_ids: list[str] = field(default_factory=list)  # preempted this step
    step_id: int = 0  # the scheduler's sequence number, naming the plan for `update`
    retry: bool = False  # a failed step's sequences run again (engine); seeded draws go
    # by (seed, position), so the retry draws what the failed step would have
    num_spec_tokens: int = 0  # guesses the runner's proposer makes after this step, per
    # sampling request (speculative decoding; 0: none)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass(frozen=True, slots=True)
class StepResult:
    """What the runner computed for a plan, aligned with `plan.seqs`."""

    # per seq: the tokens it emitted this step, in order (empty unless sample=True): one,
    # or with speculation the accepted drafts and the token after them (1..k+1)
    sampled_token_ids: list[list[int]]
    logprobs: list[list[Logprobs] | None]  # per seq: each emitted token's logprob + top-N
    prompt_logprobs: list[list[Logprobs | None] | None]  # per seq: one entry per prompt
    # position computed this step (None for position 0), if prompt_logprobs was asked
    # per seq: the proposer's guesses of the tokens after the emitted ones (speculative
    # decoding), for the scheduler to verify next step; None when speculation is off
    draft_token_ids: list[list[int]] | None = None
    # per seq: the rank in the vocabulary of each emitted token (aligned with `logprobs`),
    # and of each prompt token (aligned with `prompt_logprobs`), where those were asked
    logprob_ranks: list[list[int] | None] | None = None
    prompt_logprob_ranks: list[list[int | None] | None] | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprobs] | None = None  # per generated token, if asked
    cumulative_logprob: float | None = None  # of every token, on the final output

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        """Time to first token (s)."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    delta: bool = False  # outputs hold only what is new since the request's last output
    # (RequestOutputKind.DELTA); prompt fields come with every output all the same

    def merge(self, newer: RequestOutput) -> RequestOutput:
        """Two successive delta outputs as one (a consumer that fell behind)."""
        by_index = {c.index: c for c in self.outputs}
        for c in newer.outputs:
            old = by_index.get(c.index)
            if old is None:
                by_index[c.index] = c
                continue
            old.text += c.text
            old.token_ids = old.token_ids + c.token_ids
            if c.logprobs is not None:
                old.logprobs = (old.logprobs or []) + c.logprobs
            old.finish_reason, old.stop_reason = c.finish_reason, c.stop_reason
            old.cumulative_logprob = c.cumulative_logprob
        newer.outputs = [by_index[i] for i in sorted(by_index)]
        return newer
