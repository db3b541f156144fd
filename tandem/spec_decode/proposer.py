"""Proposers: given each request's tokens so far, guess its next few.

They run in the model runner, right after a step's tokens are sampled, for every request
that sampled; the guesses travel back to the scheduler in `StepResult.draft_token_ids`,
which decides how many of them the next step verifies (`ScheduledSeq.spec_token_ids`).

    propose(request_ids, histories, k) -> one list of at most k guesses per request
    finish(request_id)                  -> the request ended: drop (or keep) what it taught

A proposer may return fewer than k guesses, or none: the request then just decodes.
Proposals must be deterministic functions of what they were shown (every tensor-parallel
rank runs its own proposer and only rank 0's answer is used, but the seeded sampling of
the verification must not depend on which rank answered).
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import Any

from tandem.config import SpeculativeConfig


class Proposer:
    def propose(self, request_ids: Sequence[str], histories: Sequence[Sequence[int]],
                k: int) -> list[list[int]]:
        raise NotImplementedError

    def finish(self, request_id: str) -> None:
        """Forget a request (finished or aborted); default: nothing kept."""


class NgramProposer(Proposer):
    """Prompt lookup: find the request's last n tokens (n from prompt_lookup_max down to
    prompt_lookup_min) earlier in its own prompt + output, and propose the k tokens that
    followed the most recent such occurrence.

    Per request an index of n-gram -> the position after its latest occurrence is kept
    up to date as tokens arrive, so a step costs O(new tokens x n range), not O(length).

        tokens   a b c d x y a b c ?        last 3 = "a b c", seen ending at 3
        propose  d x y (the tokens after that occurrence)
    """

    def __init__(self, n_min: int = 1, n_max: int = 4) -> None:
        self.n_min, self.n_max = n_min, n_max
        # request id -> (tokens indexed so far, {ngram: end position of latest occurrence})
        self._index: dict[str, tuple[int, dict[tuple[int, ...], int]]] = {}

    def _update(self, rid: str, tokens: Sequence[int]) -> dict[tuple[int, ...], int]:
        done, table = self._index.get(rid, (0, {}))
        if done > len(tokens):  # shorter than before (a retried step): start over
            done, table = 0, {}
        # Index every n-gram that ends before the last token: an occurrence must be
        # followed by at least one token to propose anything.
        for end in range(max(done, 1), len(tokens)):
            for n in range(self.n_min, min(self.n_max, end) + 1):
                table[tuple(tokens[end - n:end])] = end
        self._index[rid] = (max(done, len(tokens) - 1) if tokens else 0, table)
        return table

    def propose(self, request_ids: Sequence[str], histories: Sequence[Sequence[int]],
                k: int) -> list[list[int]]:
        out = []
        for rid, tokens in zip(request_ids, histories):
            table = self._update(rid, tokens)
            guess: list[int] = []
            for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
                end = table.get(tuple(tokens[len(tokens) - n:]))
                if end is not None:
                    guess = list(tokens[end:end + k])
                    break
            out.append(guess)
        return out

    def finish(self, request_id: str) -> None:
        self._index.pop(request_id, None)


def make_proposer(config: SpeculativeConfig, engine_config: Any = None,
                  runner: Any = None) -> Proposer:
    """The proposer `config.method` names; the draft model shares the runner's device."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "suffix":
        from tandem.spec_decode.suffix import SuffixProposer
        return SuffixProposer()
    from tandem.spec_decode.draft_model import DraftModelProposer
    return DraftModelProposer(config, engine_config, runner)
