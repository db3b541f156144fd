"""Engine statistics: one `EngineStats` snapshot per step, exported by the server's /metrics
and its periodic log line."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.outputs import StepPlan
from tandem.request import Request


@dataclass(frozen=True, slots=True)
class EngineStats:
    step: int  # steps run so far
    num_prefill_tokens: int  # prompt (or recomputed) tokens computed in the last step
    num_decode_tokens: int  # decode tokens computed in the last step
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int  # blocks held by live requests
    num_kv_blocks_total: int
    kv_cache_usage: float  # num_kv_blocks_used / num_kv_blocks_total
    prefix_cache_queries: int  # cumulative prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # cumulative prompt tokens found there
    num_preemptions: int  # cumulative
    prompt_tokens_total: int  # cumulative prompt tokens of requests that produced a token
    generation_tokens_total: int  # cumulative generated tokens
    # Speculative decoding, cumulative: draft tokens verified, accepted, verify steps of a
    # request, and accepted drafts by position (index j: the (j+1)-th draft of a step)
    spec_drafted_total: int = 0
    spec_accepted_total: int = 0
    spec_verify_steps_total: int = 0
    spec_accepted_per_position: tuple[int, ...] = ()

    @property
    def spec_acceptance_rate(self) -> float:
        return (self.spec_accepted_total / self.spec_drafted_total
                if self.spec_drafted_total else 0.0)

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens emitted per verify step: accepted drafts + the target's own token."""
        return (1 + self.spec_accepted_total / self.spec_verify_steps_total
                if self.spec_verify_steps_total else 0.0)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


def split_step_tokens(plan: StepPlan, requests: list[Request]) -> tuple[int, int]:
    """(prefill tokens, decode tokens) of a plan (requests: aligned with its seqs): a decode
    computes one generated token, or that and the drafts it verifies."""
    decode = sum(s.num_new_tokens for s, r in zip(plan.seqs, requests)
                 if (s.num_new_tokens == 1 or s.spec_token_ids)
                 and s.start_pos >= r.num_prompt_tokens)
    return plan.num_batched_tokens - decode, decode


def merge_stats(parts: list[EngineStats]) -> EngineStats:
    """Several engines' snapshots as one (disaggregation's decode workers): counts add up,
    the KV usage is over all their blocks."""
    if len(parts) == 1:
        return parts[0]
    total = {f: sum(getattr(s, f) for s in parts) for f in (
        "step", "num_prefill_tokens", "num_decode_tokens", "num_running", "num_waiting",
        "num_kv_blocks_used", "num_kv_blocks_total", "prefix_cache_queries",
        "prefix_cache_hits", "num_preemptions", "prompt_tokens_total",
        "generation_tokens_total", "spec_drafted_total", "spec_accepted_total",
        "spec_verify_steps_total")}
    width = max(len(s.spec_accepted_per_position) for s in parts)
    per_pos = tuple(sum(s.spec_accepted_per_position[i] for s in parts
                        if i < len(s.spec_accepted_per_position)) for i in range(width))
    usage = total["num_kv_blocks_used"] / max(1, total["num_kv_blocks_total"])
    return EngineStats(kv_cache_usage=usage, spec_accepted_per_position=per_pos, **total)
