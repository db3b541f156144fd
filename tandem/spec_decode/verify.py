"""Verification: how many of a request's drafts the target accepts.

A step that verifies k drafts d_1..d_k of a request feeds the target its last token and the
drafts (k+1 rows) and samples every row exactly as plain decoding would: row j samples t_j
~ p_j, the target's distribution after temperature, top-k/top-p/min-p, with the request's
(seed, position) draw when seeded. Then

    a = the number of leading drafts with d_j == t_{j-1}     (t_0 follows the last token)
    emitted = t_0 .. t_a                                      (a accepted drafts + one more)

Why this is lossless: row j's input is only right if every draft before it was accepted,
and then its sample t_j is distributed exactly as plain decoding's token at that position.
For a proposer whose draft is a single token (q one-hot on d, the n-gram and suffix
proposers), this IS speculative sampling: P(accept d) = p(d) = min(1, p(d)/q(d)), and on
rejection t ~ p(. | t != d) = norm(max(0, p - q)). At temperature 0 it reduces to "accept
while the draft equals the target's argmax". A draft model's proposals are verified the
same way (as one-hot), which stays lossless; the p/q rule would accept more often at
temperature > 0 (not built yet).

`SyntheticAcceptance` (benchmarks only, `synthetic_acceptance_rate`): accept each draft
with probability `rate` instead of checking it, to measure the machinery at a known
acceptance on random weights; the output is then not the model's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def accepted_length(drafts: Sequence[int], sampled: Sequence[int]) -> int:
    """Leading drafts equal to the target's sample at the row before them.
    sampled has len(drafts) + 1 rows; returns a in [0, len(drafts)]."""
    a = 0
    while a < len(drafts) and drafts[a] == sampled[a]:
        a += 1
    return a


class SyntheticAcceptance:
    def __init__(self, rate: float, seed: int = 0) -> None:
        self.rate = rate
        self._rng = random.Random(seed)

    def accepted(self, k: int) -> int:
        a = 0
        while a < k and self._rng.random() < self.rate:
            a += 1
        return a
