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
same way at temperature 0; at temperature > 0 it samples its guesses from its own
distribution q (after the same temperature / top-k / top-p / min-p) and `accept_pq`
applies the rule for a q that is not one-hot:

    accept d_j with probability min(1, p_j(d_j) / q_j(d_j))
    on the first rejection: a token from norm(max(0, p_j - q_j)), and stop
    all k accepted: the row-k sample (plain decoding's token at that position)

Seeded requests draw u_j and the residual's sample from (seed, position) streams of their
own, so they stay reproducible.

`SyntheticAcceptance` (benchmarks only, `synthetic_acceptance_rate`): accept each draft
with probability `rate` instead of checking it, to measure the machinery at a known
acceptance on random weights; the output is then not the model's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from tandem.runner.sampler import row_seed, seeded_generator

_UNIFORM, _RESIDUAL = 0x5BD1E995, 0x27D4EB2F  # stream salts of the p/q rule's draws


def accepted_length(drafts: Sequence[int], sampled: Sequence[int]) -> int:
    """Leading drafts equal to the target's sample at the row before them.
    sampled has len(drafts) + 1 rows; returns a in [0, len(drafts)]."""
    a = 0
    while a < len(drafts) and drafts[a] == sampled[a]:
        a += 1
    return a


def accept_pq(p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int], bonus: int,
              seed: int | None, positions: Sequence[int]) -> list[int]:
    """The tokens a step emits for a request whose drafts were sampled from q.
    p: (k+1, V) the target's sampling distributions at the rows, q: (k, V) the draft's,
    bonus: the target's own sample at row k, positions: the position each row samples."""
    def gen(salt: int, pos: int) -> torch.Generator | None:
        return None if seed is None else seeded_generator(p.device, row_seed(seed ^ salt, pos))

    out: list[int] = []
    for j, d in enumerate(drafts):
        u = torch.rand((), device=p.device, generator=gen(_UNIFORM, positions[j])).item()
        pj, qj = p[j, d].item(), q[j, d].item()
        if u * qj < pj:  # u < p / q: accepted
            out.append(d)
            continue
        residual = (p[j] - q[j]).clamp_min(0.0)
        if residual.sum().item() <= 0.0:  # p == q where it matters: nothing to correct
            residual = p[j]
        noise = torch.empty_like(residual).exponential_(generator=gen(_RESIDUAL,
                                                                      positions[j]))
        out.append(int((residual / noise).argmax().item()))
        return out
    return out + [bonus]


class SyntheticAcceptance:
    def __init__(self, rate: float, seed: int = 0) -> None:
        self.rate = rate
        self._rng = random.Random(seed)

    def accepted(self, k: int) -> int:
        a = 0
        while a < k and self._rng.random() < self.rate:
            a += 1
        return a
