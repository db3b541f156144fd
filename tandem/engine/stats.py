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

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


def split_step_tokens(plan: StepPlan, requests: list[Request]) -> tuple[int, int]:
    """(prefill tokens, decode tokens) of a plan (requests: aligned with its seqs): a decode
    computes one generated token."""
    decode = sum(1 for s, r in zip(plan.seqs, requests)
                 if s.num_new_tokens == 1 and s.start_pos >= r.num_prompt_tokens)
    return plan.num_batched_tokens - decode, decode
