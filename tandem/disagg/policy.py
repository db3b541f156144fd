"""Which requests prefill on the prefill engine ("remote") and which on the decode engine
itself ("local").

    always       every request that can be transferred goes remote
    never        everything local (a colocated engine with a spare prefill worker)
    conditional  remote only if the prompt's part the decode engine has not cached is long
                 (>= min_remote_tokens, and >= min_uncached_fraction of the prompt) and the
                 prefill side is not saturated (< max_prefill_queue_tokens waiting there):
                 short and mostly-cached prompts cost less to prefill in place than to ship

The defaults follow Dynamo's (2,048 uncached tokens, fraction 0.7); the measured crossover
on the lent machines is issue 19's. Not transferable (always local): prompt_logprobs (they
need every position's logits where the request runs) and n > 1.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("always", "never", "conditional")


def transferable(params, prefix_caching: bool) -> bool:
    """Whether a request's prompt KV can be computed elsewhere: one sample, no prompt
    logprobs, and both engines with prefix caching (imported blocks are prefix hits)."""
    return params.n == 1 and params.prompt_logprobs is None and prefix_caching


@dataclass(frozen=True, slots=True)
class DisaggPolicy:
    policy: str = "conditional"
    min_remote_tokens: int = 2048  # uncached prompt tokens below which prefill stays local
    min_uncached_fraction: float = 0.7
    max_prefill_queue_tokens: int = 65536  # prefill side's waiting tokens: saturated above

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"disagg policy must be one of {POLICIES}, got {self.policy!r}")
        if self.min_remote_tokens < 0 or not 0.0 <= self.min_uncached_fraction <= 1.0:
            raise ValueError("min_remote_tokens >= 0 and 0 <= min_uncached_fraction <= 1")

    def route(self, prompt_tokens: int, cached_tokens: int, prefill_queue_tokens: int,
              transferable: bool = True) -> str:
        """"remote" or "local" for a prompt of `prompt_tokens`, `cached_tokens` of which the
        decode engine holds, with `prefill_queue_tokens` waiting on the prefill engine."""
        if not transferable or self.policy == "never":
            return "local"
        if self.policy == "always":
            return "remote"
        uncached = prompt_tokens - cached_tokens
        if (uncached >= self.min_remote_tokens
                and uncached >= self.min_uncached_fraction * prompt_tokens
                and prefill_queue_tokens < self.max_prefill_queue_tokens):
            return "remote"
        return "local"
