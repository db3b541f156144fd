"""The suffix proposer (spec_decode/suffix.py) against hand-made histories and a brute-force
reading of its definition: every window of max_match_len + max_spec_tokens tokens counted,
the longest continued suffix matched, the most frequent next token (smallest id on ties)
taken while its share of the continuing occurrences is >= min_token_prob."""

from __future__ import annotations

import random
import time
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from tandem.spec_decode.proposer import make_proposer
from tandem.spec_decode.suffix import SuffixProposer
from tandem.config import SpeculativeConfig


def propose(p: SuffixProposer, tokens: list[int], k: int = 8, rid: str = "r") -> list[int]:
    return p.propose([rid], [tokens], k)[0]


def run(p: SuffixProposer, rid: str, prompt: list[int], output: list[int]) -> None:
    """Show the proposer a request step by step (first history: prompt + 1 token), finish."""
    for i in range(1, len(output) + 1):
        propose(p, prompt + output[:i], 4, rid)
    p.finish(rid)


# ---- the definition, by brute force ---------------------------------------------------------
def _walk(docs: list[list[int]], path: list[int], k: int, prob: float, depth: int) -> list[int]:
    out, path = [], list(path)
    while len(out) < k and len(path) < depth:
        nxt = Counter(d[o + len(path)] for d in docs for o in range(len(d) - len(path))
                      if d[o:o + len(path)] == path)
        if not nxt:
            break
        tok, c = min(nxt.items(), key=lambda kv: (-kv[1], kv[0]))
        if c < prob * sum(nxt.values()):
            break
        out.append(tok)
        path.append(tok)
    return out


def _match(docs: list[list[int]], tokens: list[int], max_len: int, depth: int) -> int:
    for m in range(min(max_len, len(tokens), depth - 1), 0, -1):
        pat = tokens[-m:]
        if any(d[o:o + m] == pat for d in docs for o in range(len(d) - m)):
            return m
    return 0


def oracle(tokens: list[int], shared: list[list[int]], k: int, max_match_len: int,
           max_spec_tokens: int, prob: float) -> list[int]:
    depth = max_match_len + max_spec_tokens
    own = ([tokens], _match([tokens], tokens, max_match_len, depth))
    other = (shared, _match(shared, tokens, max_match_len, depth))
    for docs, m in ([own, other] if own[1] >= other[1] else [other, own]):
        if m:
            guess = _walk(docs, tokens[-m:], k, prob, depth)
            if guess:
                return guess
    return []


# ---- hand-made histories --------------------------------------------------------------------
def test_make_proposer_builds_it():
    assert isinstance(make_proposer(SpeculativeConfig("suffix", 4)), SuffixProposer)


def test_continues_a_repeated_code_fragment():
    frag = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # "def f(x): return x + 1"
    hist = [1, 2] + frag + [3, 4, 5] + frag[:3]
    assert propose(SuffixProposer(), hist, 5) == frag[3:8]
    assert propose(SuffixProposer(), hist, 20) == frag[3:] + [3, 4, 5] + frag[:3]  # to the end


def test_at_most_k_and_nothing_without_a_match():
    hist = [7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8]
    p = SuffixProposer()
    assert propose(p, hist, 3) == [9, 1, 2]
    assert propose(p, hist, 1) == [9]
    assert propose(p, hist, 0) == []
    assert propose(SuffixProposer(), [1, 2, 3, 4], 4) == []
    assert propose(SuffixProposer(), [], 4) == []


def test_the_longest_match_wins_over_frequency():
    # "2" is mostly followed by 5, but "1 2" (longer) was followed by 6
    hist = [3, 2, 5, 3, 2, 5, 4, 2, 5, 1, 2, 6, 0, 1, 2]
    assert propose(SuffixProposer(), hist, 1) == [6]
    assert propose(SuffixProposer(), [9, 2], 1) == []  # no history: nothing
    assert propose(SuffixProposer(), hist[:-2] + [8, 2], 1) == [5]  # only "2" matches


def test_the_most_frequent_continuation_ties_to_the_smallest_id():
    hist = [1, 2, 9, 0, 1, 2, 9, 0, 1, 2, 8, 0, 5, 1, 2]
    assert propose(SuffixProposer(), hist, 2) == [9, 0]  # after "1 2": 9 twice, 8 once
    tie = [1, 2, 9, 0, 1, 2, 8, 0, 5, 1, 2]
    assert propose(SuffixProposer(), tie, 2) == [8, 0]


def test_stops_when_the_next_token_is_too_rare():
    hist = [0, 7, 1, 2, 3, 0, 7, 1, 2, 4, 0, 7]  # after "0 7": 1, 2 (sure), then 3 or 4
    assert propose(SuffixProposer(min_token_prob=0.6), hist, 8) == [1, 2]
    assert propose(SuffixProposer(min_token_prob=0.5), hist, 8) == [1, 2, 3, 0, 7, 1, 2, 4]
    spread = [1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2, 6, 1, 2]  # 3, 4, 5, 6: a quarter each
    assert propose(SuffixProposer(min_token_prob=0.3), spread, 4) == []
    assert propose(SuffixProposer(min_token_prob=0.2), spread, 4) == [3, 1, 2, 4]


def test_the_depth_bounds_match_and_proposal():
    frag = list(range(100, 120))
    hist = frag + [1] + frag[:12]
    p = SuffixProposer(max_match_len=4, max_spec_tokens=3)
    assert propose(p, hist, 8) == frag[12:15]  # matched 4, window of 7


# ---- across requests ------------------------------------------------------------------------
def test_a_finished_output_is_proposed_to_the_next_request():
    p = SuffixProposer()
    answer = list(range(200, 240))
    run(p, "a", [1, 2, 3], answer)
    assert "a" not in p._requests
    prompt = [5, 6] + answer[:10]  # quotes the earlier answer
    assert propose(p, prompt + [answer[10]], 6, "b") == answer[11:17]
    assert propose(p, [5, 6, 1, 2, 3], 4, "c") == []  # prompts are not cached by default
    q = SuffixProposer(cache_prompts=True)
    run(q, "a", [1, 2, 3], answer)
    assert propose(q, [5, 6, 1, 2, 3], 4, "c") == answer[:4]


def test_own_history_wins_ties_with_the_shared_cache():
    p = SuffixProposer()
    run(p, "a", [0], [1, 2, 3, 4])  # shared: after "1 2", 3
    hist = [1, 2, 7, 1, 2]  # own: after "1 2", 7 (match of 2 both)
    assert propose(p, hist, 1, "b") == [7]
    assert propose(p, [9, 1, 2], 1, "c") == [3]


def test_the_shared_cache_evicts_the_oldest_outputs():
    p = SuffixProposer(max_cached_requests=2)
    outs = [[100 * i + j for j in range(30)] for i in range(1, 5)]
    for i, out in enumerate(outs):
        run(p, f"r{i}", [0], out)
    assert len(p._cached) == 2
    assert propose(p, [9, 100, 101], 3, "x") == []  # r0, r1 evicted
    assert propose(p, [9, 200, 201], 3, "x2") == []
    assert propose(p, [9, 300, 301], 3, "y") == [302, 303, 304]
    assert propose(p, [9, 400, 401], 3, "z") == [402, 403, 404]
    # many repeats of the same outputs: the trie stays at the size of what is cached
    same = SuffixProposer(max_cached_requests=3)
    for i in range(30):
        run(same, f"s{i}", [0], outs[i % 4])
    fresh = SuffixProposer(max_cached_requests=3)
    for i in (3, 0, 1):  # the last three: i = 27, 28, 29
        run(fresh, f"t{i}", [0], outs[i])
    assert _nodes(same._shared.root) == _nodes(fresh._shared.root) == 1 + 3 * 30
    assert propose(same, [9, 300, 301], 3, "x") == []  # outs[2] last seen at i=26: evicted
    assert propose(same, [9, 200, 201], 3, "y") == [202, 203, 204]


def _nodes(node) -> int:
    return 1 + sum(_nodes(c) for c in (node.children or {}).values())


# ---- incremental updates --------------------------------------------------------------------
def test_a_retried_step_rebuilds_the_request():
    p = SuffixProposer()
    hist = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2]
    propose(p, hist + [3, 4], 2)
    assert propose(p, hist, 2) == propose(SuffixProposer(), hist, 2) == [3, 4]  # shorter
    propose(p, hist + [3], 2)
    assert propose(p, hist + [9], 2) == []  # same length, another last token: rebuilt
    assert propose(p, hist + [9, 1, 2], 2) == propose(SuffixProposer(), hist + [9, 1, 2], 2)


tokens_st = st.lists(st.integers(0, 3), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(hist=tokens_st, cuts=st.lists(st.integers(1, 40), max_size=6),
       finished=st.lists(tokens_st, max_size=4), k=st.integers(1, 5),
       prob=st.sampled_from([0.0, 0.3, 0.5, 1.0]), max_match_len=st.integers(1, 5),
       max_spec_tokens=st.integers(1, 4), max_cached=st.integers(1, 3))
def test_incremental_equals_fresh_equals_definition(hist, cuts, finished, k, prob,
                                                    max_match_len, max_spec_tokens,
                                                    max_cached):
    def make() -> SuffixProposer:
        p = SuffixProposer(max_match_len, max_spec_tokens, prob, max_cached)
        for i, doc in enumerate(finished):  # prompt doc[:1], output doc[1:]
            for j in range(1, len(doc) + 1):
                p.propose([f"f{i}"], [doc[:j]], k)
            p.finish(f"f{i}")
        return p

    shared = [d for d in finished if d][-max_cached:]
    inc = make()
    for cut in sorted(cuts):  # earlier, shorter views of the same request
        if cut < len(hist):
            view = hist[:cut]
            assert propose(inc, view, k) == oracle(view, shared, k, max_match_len,
                                                   max_spec_tokens, prob)
    want = oracle(hist, shared, k, max_match_len, max_spec_tokens, prob)
    assert propose(inc, hist, k) == propose(make(), hist, k) == want


@settings(max_examples=60, deadline=None)
@given(docs=st.lists(tokens_st, min_size=1, max_size=6), probe=tokens_st,
       max_cached=st.integers(1, 3))
def test_eviction_leaves_what_the_remaining_outputs_build(docs, probe, max_cached):
    p = SuffixProposer(max_match_len=3, max_spec_tokens=3, max_cached_requests=max_cached)
    for i, doc in enumerate(docs):
        run(p, f"d{i}", [], doc)  # first history doc[:1]: the output is doc[0:]
    shared = docs[-max_cached:]
    assert propose(p, probe, 4, "probe") == oracle(probe, shared, 4, 3, 3, 0.1)


# ---- cost -----------------------------------------------------------------------------------
def test_a_step_at_10k_tokens_is_cheap():
    """Per call, after warm-up, at a 10k-token history that copies itself (the costly
    case: ~depth windows move each step) with 100 cached outputs. Typically ~20 us."""
    rng = random.Random(0)
    chunk = [rng.randrange(32000) for _ in range(500)]
    hist: list[int] = []
    while len(hist) < 10_200:
        copy = list(chunk)
        copy[rng.randrange(500)] = rng.randrange(32000)  # near, not exact, copies
        hist += copy
    p = SuffixProposer()
    for i in range(100):
        run(p, f"o{i}", [], [rng.randrange(1000) for _ in range(300)])
    view = hist[:10_000]
    propose(p, view)  # index the history once
    times = []
    for t in hist[10_000:10_200]:
        view.append(t)
        start = time.perf_counter()
        guess = propose(p, view)
        times.append(time.perf_counter() - start)
    times.sort()
    assert len(guess) == 8
    assert times[len(times) // 2] < 0.020, f"median {times[len(times) // 2] * 1e3:.2f} ms"
