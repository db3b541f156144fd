"""Switched by load: how many drafts each request verifies this step (0 = plain decode).

Verifying k drafts costs a forward over k + 1 rows per request instead of 1, plus the
proposer's work; it pays back E(a, k) tokens a step, where a is the chance that a draft is
accepted (each one given the ones before it were):

    E(a, k) = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a)

At batch 1 a forward of 5 rows costs about what 1 row costs (the weights are read once
either way), so k = 4 at a = 0.8 is ~3.4x; at large batch the forward is compute-bound,
k + 1 rows cost ~k + 1 times as much, and speculation loses. So each step picks the k (one
for the step, capped per request by what it has proposed) that maximizes

    tokens / time = sum_i E(a_i, k_i) / (verify(sum_i (1 + k_i)) + k * draft(B))

plus the step's overhead, with verify(rows) and draft(rows) the step costs profiled at
start-up on the device (`profile_spec_costs` in the model runner; draft = 0 for the host
proposers), the overhead what measured steps took beyond those (learned as it runs), B the
decoding requests, and a_i each request's running estimate (accepted / tried over its
recent verify steps, starting from PRIOR; see `observe`). A request whose estimate falls
below MIN_ALPHA verifies nothing, except one draft on the probe steps (every PROBE_EVERY-th,
the same step for every stopped request) to notice when its text turns predictable again,
and only when speculation could pay at this batch were it back at PRIOR. A step that asks
for drafts cannot be pipelined with the next (the drafts come from its tokens), so probes
that each request took on its own clock would stall every step of a large batch. A step
where drafts were wanted and the proposer had none counts as a rejected draft. Decisions
are logged at debug level.

Two costs besides: a step's prefill rows are charged to the prefill (the decodes pay only
what they add to verify(prefill)), and with async scheduling the host work of a step
(measured) counts: a pipelined step (k = 0) takes max(device, host), a step that proposes
device + host, since it is collected before the next is planned. (So where the host is the
bottleneck, as with a tiny model on a GPU, more tokens per step pay for it.)
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

PRIOR = 0.6  # a new request's acceptance estimate
PRIOR_WEIGHT = 2.0  # ... worth this many tries (one bad step does not switch it off)
MIN_ALPHA = 0.15  # below this a request stops speculating (but probes)
PROBE_EVERY = 16  # steps between probes of a request that stopped
DECAY = 0.7  # weight of the past in the running estimate


def expected_tokens(alpha: float, k: int) -> float:
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


@dataclass
class StepCosts:
    """Seconds per step by rows: verify[rows] (the target's forward + logits + sampling
    of that many one-token queries), draft[rows] (one proposer forward; empty: free)."""

    verify: dict[int, float]
    draft: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # More rows never cost less: a point above a larger row count's is noise (a busy
        # host during the profile), cut down to it.
        for table in (self.verify, self.draft):
            best = float("inf")
            for rows in sorted(table, reverse=True):
                best = table[rows] = min(table[rows], best)

    @staticmethod
    def _at(table: dict[int, float], rows: int) -> float:
        if not table or rows <= 0:
            return 0.0
        xs = sorted(table)
        if rows <= xs[0]:
            return table[xs[0]]
        if rows >= xs[-1]:  # linear beyond the last point, from the last two
            if len(xs) == 1:
                return table[xs[0]] * rows / xs[0]
            a, b = xs[-2], xs[-1]
            return table[b] + (table[b] - table[a]) / (b - a) * (rows - b)
        j = bisect.bisect_left(xs, rows)
        a, b = xs[j - 1], xs[j]
        return table[a] + (table[b] - table[a]) * (rows - a) / (b - a)

    def verify_at(self, rows: int) -> float:
        return self._at(self.verify, rows)

    def draft_at(self, rows: int) -> float:
        return self._at(self.draft, rows)


class SpecSwitch:
    def __init__(self, k_max: int, costs: StepCosts | None) -> None:
        """costs None: no switching, every decode verifies up to k_max drafts (tests)."""
        self.k_max, self.costs = k_max, costs
        # What a step costs beyond the profiled forwards (host work, attention over long
        # contexts), learned from the steps' measured times: the same for every k, so it
        # favors longer runs of drafts the larger it is.
        self.overhead = 0.0
        # Host seconds of a pipelined step (async scheduling: schedule and update run while
        # the device works). A step that asks for drafts is collected before the next one
        # is planned, so that work is no longer hidden: it is added to every k > 0.
        self.host = 0.0
        self._predicted = 0.0
        self._drafted: dict[str, float] = {}
        self._accepted: dict[str, float] = {}
        self._steps = 0  # choose() calls: the probe clock
        self._probe_next: set[str] = set()  # stopped requests that verify one next step

    def alpha(self, rid: str) -> float:
        d = self._drafted.get(rid, 0.0)
        return PRIOR if d == 0 else self._accepted[rid] / d

    def observe(self, rid: str, drafted: int, accepted: int) -> None:
        """A verify step's outcome. A draft is only tried if every one before it was
        accepted, so the per-draft chance a is accepted / tried, tried = accepted + (one
        rejection, if the run stopped short): accepted / drafted would undercount it."""
        tried = accepted + (accepted < drafted)
        if rid not in self._drafted:  # the prior, as PRIOR_WEIGHT tries that fade too
            self._drafted[rid], self._accepted[rid] = PRIOR_WEIGHT, PRIOR * PRIOR_WEIGHT
        self._drafted[rid] = DECAY * self._drafted[rid] + tried
        self._accepted[rid] = DECAY * self._accepted[rid] + accepted

    def step_time(self, seconds: float) -> None:
        """The measured time of the step last chosen for (schedule to update)."""
        if self._predicted > 0 and self.costs is not None:
            residual = max(seconds - self._predicted, 0.0)
            self.overhead = 0.8 * self.overhead + 0.2 * residual

    def host_time(self, seconds: float) -> None:
        """The host work of a pipelined step, as measured (engine.py)."""
        self.host = 0.8 * self.host + 0.2 * seconds

    def forget(self, rid: str) -> None:
        for d in (self._drafted, self._accepted):
            d.pop(rid, None)
        self._probe_next.discard(rid)

    def best_k(self, rids: list[str], other_rows: int = 0, alphas: list[float] | None = None
               ) -> tuple[int, list[float]]:
        """The k with the most tokens per second for these requests (no side effects), and
        the rate of every k; `alphas`: acceptance estimates to assume instead of theirs."""
        if self.costs is None:
            return self.k_max, []
        alphas = [self.alpha(r) for r in rids] if alphas is None else alphas
        # requests by estimate (many share one: the prior, or a stopped request's zero)
        groups: dict[float, int] = {}
        for a in alphas:
            groups[a] = groups.get(a, 0) + 1
        active = sum(n for a, n in groups.items() if a >= MIN_ALPHA)
        best, best_rate, rates = 0, 0.0, []
        # Prefill rows in the same step are work that happens anyway: the decodes are
        # charged only what they add to it.
        base = self.costs.verify_at(other_rows) if other_rows else 0.0
        for k in range(self.k_max + 1):
            rows = other_rows + len(rids) + k * active
            device = (self.overhead + self.costs.verify_at(rows)
                      + k * self.costs.draft_at(len(rids)))
            # a pipelined step (k = 0) takes the longer of device and host work; one that
            # proposes, both in turn
            time = (device + self.host if k else max(device, self.host)) - base
            tokens = sum(n * expected_tokens(a, k if a >= MIN_ALPHA else 0)
                         for a, n in groups.items())
            rate = tokens / time if time > 0 else tokens
            rates.append(rate)
            if k == 0 or rate > best_rate * 1.02:  # more drafts only for a real gain
                best, best_rate = k, rate
        return best, rates

    def choose(self, rids: list[str], other_rows: int = 0) -> tuple[dict[str, int], int]:
        """(drafts to verify per request, drafts to propose after this step), for the
        running requests `rids` (one row each; those still prefilling decode next);
        other_rows: the rest of the step's prefill tokens."""
        if not rids:
            return {}, 0
        if self.costs is None:
            return {r: self.k_max for r in rids}, self.k_max
        best, rates = self.best_k(rids, other_rows)
        out: dict[str, int] = {}
        probe_now, self._probe_next = self._probe_next, set()
        stopped = []
        for r in rids:
            if self.alpha(r) >= MIN_ALPHA:
                out[r] = best
            else:  # a probe takes two steps: one proposes a draft, the next verifies it
                out[r] = 1 if r in probe_now else 0
                stopped.append(r)
        self._steps += 1
        if stopped and self._steps % PROBE_EVERY == 0 and self.best_k(
                rids, other_rows, [PRIOR] * len(rids))[0] > 0:
            self._probe_next = set(stopped)
        probing = len(self._probe_next)
        # learn the overhead from decode-only steps (a prefill's cost is not profiled)
        self._predicted = 0.0 if other_rows else (
            self.costs.verify_at(len(rids) + sum(out.values()))
            + best * self.costs.draft_at(len(rids)))
        # guesses for the next step: those speculating want `best`; a probe verifies one
        propose = max(best if len(stopped) < len(rids) else 0, 1 if self._probe_next else 0)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("speculation: %d requests, alpha %s, tokens/s by k %s -> k=%d%s",
                         len(rids), [round(self.alpha(r), 2) for r in rids[:8]],
                         [round(x) for x in rates], best,
                         f", probing {probing}" if probing else "")
        return out, propose
