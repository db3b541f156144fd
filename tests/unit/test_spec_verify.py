"""The p/q acceptance rule (spec_decode/verify.accept_pq) on a small vocabulary: with the
draft sampled from q, the first emitted token is distributed as p (speculative sampling is
lossless), runs of several drafts keep every position's law, and seeded draws repeat."""

from __future__ import annotations

from collections import Counter

import torch

from tandem.spec_decode.verify import accept_pq, accepted_length

P = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
Q = torch.tensor([0.1, 0.4, 0.1, 0.3, 0.1])


def _tv(counts: Counter, probs: torch.Tensor) -> float:
    n = sum(counts.values())
    return 0.5 * sum(abs(counts[t] / n - probs[t].item()) for t in range(len(probs)))


def test_first_token_follows_p_whatever_q_proposes():
    torch.manual_seed(0)
    n = 40000
    drafts = torch.multinomial(Q, n, replacement=True).tolist()
    first = Counter()
    for i, d in enumerate(drafts):
        first[accept_pq(torch.stack([P, P]), Q[None], [d], bonus=-1, seed=None,
                        positions=[i, i + 1])[0]] += 1
    assert _tv(first, P) < 0.015  # a residual from p instead of max(0, p - q): TV 0.175
    # P(accept) = sum_x min(p, q) = 0.55
    accepted = sum(1 for d in drafts[:4000] if accept_pq(
        torch.stack([P, P]), Q[None], [d], bonus=-1, seed=None, positions=[0, 1]) == [d, -1])
    assert abs(accepted / 4000 - 0.55) < 0.03


def test_two_drafts_keep_both_positions_law_and_bonus_follows():
    torch.manual_seed(1)
    p2 = torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1])
    q2 = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    second = Counter()
    n = 20000
    for i in range(n):
        d1 = int(torch.multinomial(Q, 1))
        d2 = int(torch.multinomial(q2, 1))
        out = accept_pq(torch.stack([P, p2, P]), torch.stack([Q, q2]), [d1, d2],
                        bonus=int(torch.multinomial(P, 1)), seed=None, positions=[i, i, i])
        if len(out) >= 2:  # the first draft was accepted: the second token's law is p2
            second[out[1]] += 1
    assert _tv(second, p2) < 0.02


def test_equal_p_and_q_accept_everything_and_seeds_repeat():
    out = accept_pq(torch.stack([P, P, P]), torch.stack([P, P]), [0, 3], bonus=4, seed=None,
                    positions=[5, 6, 7])
    assert out == [0, 3, 4]
    runs = [accept_pq(torch.stack([P, P, P]), torch.stack([Q, Q]), [1, 3], bonus=2, seed=9,
                      positions=[10, 11, 12]) for _ in range(5)]
    assert all(r == runs[0] for r in runs)
    assert accepted_length([4, 5, 6], [4, 5, 9, 1]) == 2
