"""The messages between stages: `StepPlan` (scheduler -> runner), `StepResult` (runner ->
scheduler) and `RequestOutput` (engine -> caller). No torch here: results carry lists."""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.request import Request

# {token_id: logprob} for the chosen token plus the top-N alternatives at one position.
Logprobs = dict[int, float]


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """One request's share of a step: compute tokens [start_pos, start_pos + num_new_tokens)."""

    request: Request  # the live request; the runner reads token ids and sampling params
    start_pos: int  # == request.num_computed_tokens when scheduled (scheduler)
    num_new_tokens: int  # tokens to compute this step, >= 1 (scheduler)
    block_table: list[int]  # the request's KV block ids, covering start_pos + num_new_tokens
    sample: bool  # True when this chunk reaches the end of the known tokens (scheduler)
    inflight_input: bool = False  # its last input token is the one the previous step is
    # still sampling: the runner takes it from that step's device output (async scheduling)

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_new_tokens


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What one `Engine.step` computes. Decodes come first, then prefill chunks."""

    seqs: list[ScheduledSeq]  # in execution order (scheduler)
    num_batched_tokens: int  # sum of num_new_tokens, <= max_num_batched_tokens (scheduler)
    finished_request_ids: list[str] = field(default_factory=list)  # freed since the last plan;
    # the runner drops their per-request state (seeded generators) (scheduler)
    preempted_request_ids: list[str] = field(default_factory=list)  # preempted this step

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass(frozen=True, slots=True)
class StepResult:
    """What the runner computed for a plan, aligned with `plan.seqs`."""

    sampled_token_ids: list[int | None]  # the new token of each seq with sample=True, else None
    logprobs: list[Logprobs | None]  # per seq: the sampled token's logprob + top-N, if asked
    prompt_logprobs: list[list[Logprobs | None] | None]  # per seq: one entry per prompt
    # position computed this step (None for position 0), if prompt_logprobs was asked


@dataclass(slots=True)
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    logprobs: list[Logprobs] | None = None  # per generated token, if asked
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
    prompt_logprobs: list[Logprobs | None] | None
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
