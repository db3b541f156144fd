"""What the model runner keeps per request between steps (vLLM v1's CachedRequestState).

A `StepPlan` sends a request once (`NewRequestData`) and then only diffs; `apply_plan`
folds them into these states, so the runner (one per rank under tensor parallelism) reads
token ids, block tables and sampling parameters from its own copy and never from the
scheduler's objects:

    NewRequestData     -> RequestState(token_ids = prompt, block_ids = [])
    seq.new_token_ids  -> token_ids[seq.tokens_from:] = new_token_ids
    seq.new_block_ids  -> block_ids[seq.blocks_from:] = new_block_ids
    finished ids       -> state dropped

`token_ids` may lag one token behind a decode's input: the token still being sampled by
the previous step (`ScheduledSeq.inflight_input`) is read from the device instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.outputs import StepPlan
from tandem.request import SamplingParams


@dataclass(slots=True)
class RequestState:
    request_id: str
    num_prompt_tokens: int
    token_ids: list[int]  # prompt + sampled tokens the plans have sent (see module doc)
    block_ids: list[int]  # the request's block table
    params: SamplingParams
    eos_token_ids: list[int]
    # The per-row sampling values, computed once (sampling tensors are built every step):
    # temperature, top_k (0: off; capped at 2**24, beyond any vocabulary and exact in
    # float32), top_p, min_p, repetition, presence, frequency penalty.
    sampling_row: tuple[float, ...]
    # Bumped by every change to block_ids: a copy of the table made elsewhere (the fused
    # CPU step's standing block-table rows) is current while the two agree.
    blocks_version: int = 0

    def greedy_at(self, pos: int) -> bool:
        """Whether a row sampling the token at position `pos` (or later) takes the argmax
        alone: greedy, no logprobs, penalties, logit_bias, allowed_token_ids or bad_words,
        and no min_tokens ban of EOS / stop tokens left (a ban covers output tokens before
        min_tokens)."""
        p = self.params
        return (p.temperature == 0.0 and p.logprobs is None and not p.has_penalties
                and not p.logit_bias and p.allowed_token_ids is None
                and not p.bad_words_token_ids
                and (not p.min_tokens or pos - self.num_prompt_tokens >= p.min_tokens))

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


def apply_plan(states: dict[str, RequestState], plan: StepPlan) -> None:
    """Fold a plan's new requests and diffs into `states` (idempotent for one plan)."""
    for rid in plan.finished_request_ids:
        states.pop(rid, None)
    for new in plan.new_requests:
        p = new.sampling_params
        states[new.request_id] = RequestState(
            new.request_id, len(new.prompt_token_ids), list(new.prompt_token_ids), [], p,
            list(new.eos_token_ids),
            (p.temperature, min(p.top_k, 1 << 24), p.top_p, p.min_p, p.repetition_penalty,
             p.presence_penalty, p.frequency_penalty))
    for seq in plan.seqs:
        state = states.get(seq.request_id)
        if state is None:
            raise RuntimeError(f"the plan schedules {seq.request_id!r}, which the runner "
                               f"has never been sent")
        if seq.new_token_ids or seq.tokens_from < len(state.token_ids):
            del state.token_ids[seq.tokens_from:]
            state.token_ids += seq.new_token_ids
        if seq.new_block_ids or seq.blocks_from < len(state.block_ids):
            del state.block_ids[seq.blocks_from:]
            state.block_ids += seq.new_block_ids
            state.blocks_version += 1
