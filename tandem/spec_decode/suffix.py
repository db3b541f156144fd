"""The `suffix` proposer: SuffixDecoding (Oliaro et al., 2024, arXiv 2411.04975).

Guesses come from two suffix tries: one over the request's own tokens (prompt + output so
far), and one shared by all requests over the outputs of the last `max_cached_requests`
finished ones. Each trie holds every window of `depth = max_match_len + max_spec_tokens`
tokens of its documents, with the number of windows through each node (the count of that
substring). To propose, find the longest suffix of the request (<= max_match_len tokens)
that some occurrence continues, then walk down greedily: the most frequent next token,
while its share of the occurrences that continue stays >= min_token_prob.

    tokens  a b x . a b x . a b y . a b ?       (windows of depth 4)

    root ─┬─ a 4 ── b 4 ─┬─ x 2 ── . 2       "a b" occurs 4 times, 3 of them continue
          │              └─ y 1 ── . 1       (the 4th is the request's own end)
          ├─ b 4 ─┬─ x 2 ── . 2 ── a 2
          │       └─ y 1 ── . 1 ── a 1
          └─ x 2 ── . 2 ── a 2 ── b 2   ...

    match "a b" -> x (2 of 3 >= 0.1) -> . (2 of 2) -> depth 4: propose [x, .]

Ties between equally frequent tokens go to the smallest token id, so proposals are a
deterministic function of the documents shown. The request's own trie wins when its match
is at least as long as the shared trie's; if the winner's walk proposes nothing (its first
step is below min_token_prob), the other trie is asked.

Windows seen only once are not spelled out node by node: a leaf holds the one occurrence
(document, start) and reads the rest of its window from the document's token list. A trie
thus has one leaf per window plus one node per distinct substring (<= depth tokens) seen
at least twice, far below n x depth unless the text copies itself at length (10k tokens:
~11k nodes for random text, ~25k for 20 near-copies of a 500-token block).

    a 2nd window reaches leaf "a b x":   a ── b ── x leaf(doc, 0)
                                 becomes  a ── b ── x 2 ── . leaf(doc, 0)

Appending a token moves each "active" window one level down: the windows that end at the
request's end and whose text still occurs elsewhere (<= depth of them; a window whose
text became unique is a leaf that grows with the document for free). So a step costs
O(active windows + max_match_len x log max_match_len) for the two longest-match binary
searches (a suffix that matches implies every shorter one does) + O(k) for the walk,
not O(history). Inserting a finished output into the shared trie replays the same
appends; evicting one walks its windows back out (O(length x depth) at finish time).
A history that shrinks or changes its last seen token (a retried step) is re-indexed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from tandem.spec_decode.proposer import Proposer


class _Node:
    """A trie node, or (children is None) a leaf: the one window that reaches it, read
    from doc[start:start + depth]."""

    __slots__ = ("count", "cont", "best", "children", "doc", "start")

    def __init__(self, doc: list[int] | None = None, start: int = 0) -> None:
        self.count = 1  # windows through this node (the occurrences of its substring)
        self.cont = 0  # of those, the ones that continue: the sum of children's counts
        self.best: int | None = None  # most frequent child's token; None: recompute
        self.children: dict[int, _Node] | None = None if doc is not None else {}
        self.doc, self.start = doc, start  # leaves only: the occurrence they hold

    def best_child(self) -> int:
        if self.best is None:  # after an eviction: (count, smallest token id) wins
            kids = self.children
            self.best = max(kids, key=lambda t: (kids[t].count, -t))
        return self.best


class _SuffixTrie:
    """Every window of `depth` tokens of some documents, with counts (module docstring)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.root = _Node()

    def append(self, doc: list[int], active: list[tuple[int, _Node]], token: int) -> None:
        """Add `token` to the end of `doc`. `active` lists (start, node) for the windows
        that end at doc's end at a node with count >= 2, oldest first; updated in place."""
        doc.append(token)
        pos = len(doc) - 1
        active.append((pos, self.root))
        still = []
        for start, node in active:
            depth = pos - start + 1  # the depth this window moves down to
            child = node.children.get(token)
            if child is None:  # a new branch: this window is unique from here down
                node.children[token] = _Node(doc, start)
            else:
                if child.children is None:
                    self._split(child, depth)
                child.count += 1
                if depth < self.depth:
                    still.append((start, child))
            self._bump(node, token)
        active[:] = still

    def _split(self, leaf: _Node, depth: int) -> None:
        """A second window reaches `leaf` (at trie depth `depth`): make it a node whose one
        child is the leaf's occurrence one token further down, if its window goes on."""
        doc, start = leaf.doc, leaf.start
        leaf.children, leaf.doc = {}, None
        nxt = start + depth
        if depth < self.depth and nxt < len(doc):
            leaf.children[doc[nxt]] = _Node(doc, start)
            leaf.cont, leaf.best = 1, doc[nxt]

    @staticmethod
    def _bump(node: _Node, token: int) -> None:
        """node's child `token` gained one window."""
        node.cont += 1
        kids, b = node.children, node.best
        if len(kids) == 1:
            node.best = token
        elif b is not None and b != token:
            c, cb = kids[token].count, kids[b].count
            if c > cb or (c == cb and token < b):
                node.best = token

    def insert(self, tokens: Sequence[int]) -> list[int]:
        """Add a finished document; returns the list the trie's leaves read from."""
        doc: list[int] = []
        active: list[tuple[int, _Node]] = []
        for t in tokens:
            self.append(doc, active, t)
        return doc

    def remove(self, doc: list[int]) -> None:
        """Take the windows of a document added by `insert` back out."""
        for s in range(len(doc)):
            node = self.root
            for j in range(s, min(s + self.depth, len(doc))):
                tok = doc[j]
                child = node.children[tok]
                node.cont -= 1
                if node.best == tok:
                    node.best = None
                if child.children is None or child.count == 1:  # only this window below
                    del node.children[tok]
                    break
                child.count -= 1
                node = child

    def _locate(self, tokens: Sequence[int], m: int) -> tuple[_Node, int] | None:
        """The node (or leaf) that spells tokens[-m:], if it has a next token."""
        node, depth = self.root, 0
        for i in range(len(tokens) - m, len(tokens)):
            t = tokens[i]
            if node.children is None:  # inside a leaf: follow its one occurrence
                j = node.start + depth
                if depth >= self.depth or j >= len(node.doc) or node.doc[j] != t:
                    return None
            else:
                node = node.children.get(t)
                if node is None:
                    return None
            depth += 1
        if node.children is None:
            ends = node.start + depth < min(node.start + self.depth, len(node.doc))
        else:
            ends = node.cont > 0
        return (node, depth) if ends else None

    def match(self, tokens: Sequence[int], max_len: int) -> tuple[int, _Node, int] | None:
        """(m, node, depth) for the longest suffix of tokens, m <= max_len, that some
        occurrence continues. Binary search: if tokens[-m:] matches, so does tokens[-m+1:]
        (the same occurrence, one token later)."""
        lo, hi, found = 1, min(max_len, len(tokens), self.depth - 1), None
        while lo <= hi:
            mid = (lo + hi) // 2
            hit = self._locate(tokens, mid)
            if hit is None:
                hi = mid - 1
            else:
                lo, found = mid + 1, (mid, *hit)
        return found

    def continuation(self, node: _Node, depth: int, k: int, min_prob: float) -> list[int]:
        """Greedy walk: the most frequent next token while it is >= min_prob of the
        occurrences that continue, at most k tokens and down to the trie's depth."""
        out: list[int] = []
        while len(out) < k and depth < self.depth:
            if node.children is None:  # one occurrence left: its tokens, probability 1
                end = min(node.start + self.depth, len(node.doc),
                          node.start + depth + k - len(out))
                out.extend(node.doc[node.start + depth:end])
                break
            if not node.cont:
                break
            tok = node.best_child()
            child = node.children[tok]
            if child.count < min_prob * node.cont:
                break
            out.append(tok)
            node, depth = child, depth + 1
        return out


class _History:
    """One request's own trie and the windows still moving down it."""

    __slots__ = ("trie", "doc", "active", "output_start")

    def __init__(self, depth: int, output_start: int) -> None:
        self.trie = _SuffixTrie(depth)
        self.doc: list[int] = []  # the tokens indexed so far (our copy: leaves read it)
        self.active: list[tuple[int, _Node]] = []
        self.output_start = output_start  # where the output begins in doc (see finish)


class SuffixProposer(Proposer):
    """Proposals from the request's own tokens and recent requests' outputs (module
    docstring). The output is what follows the first history this proposer was shown for
    the request, less its last token (the first sample comes right after the prompt)."""

    def __init__(self, max_match_len: int = 32, max_spec_tokens: int = 16,
                 min_token_prob: float = 0.1, max_cached_requests: int = 1000,
                 cache_prompts: bool = False) -> None:
        if max_match_len < 1 or max_spec_tokens < 1 or max_cached_requests < 0:
            raise ValueError("SuffixProposer needs max_match_len >= 1, max_spec_tokens >= 1 "
                             "and max_cached_requests >= 0")
        if not 0.0 <= min_token_prob <= 1.0:
            raise ValueError(f"min_token_prob must be in [0, 1], got {min_token_prob}")
        self.max_match_len = max_match_len
        self.min_token_prob = min_token_prob
        self.max_cached_requests = max_cached_requests
        self.cache_prompts = cache_prompts  # also put prompts in the shared trie
        self.depth = max_match_len + max_spec_tokens
        self._requests: dict[str, _History] = {}
        self._shared = _SuffixTrie(self.depth)
        self._cached: deque[list[int]] = deque()  # the shared trie's documents, oldest first

    def propose(self, request_ids: Sequence[str], histories: Sequence[Sequence[int]],
                k: int) -> list[list[int]]:
        return [self._propose_one(rid, tokens, k) for rid, tokens in zip(request_ids, histories)]

    def _propose_one(self, rid: str, tokens: Sequence[int], k: int) -> list[int]:
        hist = self._sync(rid, tokens)
        if k <= 0 or not tokens:
            return []
        own = hist.trie.match(tokens, self.max_match_len)
        shared = self._shared.match(tokens, self.max_match_len)
        tries = [(hist.trie, own), (self._shared, shared)]
        if shared is not None and (own is None or own[0] < shared[0]):
            tries.reverse()
        for trie, hit in tries:
            if hit is not None:
                guess = trie.continuation(hit[1], hit[2], k, self.min_token_prob)
                if guess:
                    return guess
        return []

    def _sync(self, rid: str, tokens: Sequence[int]) -> _History:
        """The request's history, indexed up to the end of `tokens`."""
        hist = self._requests.get(rid)
        n = len(hist.doc) if hist is not None else 0
        if hist is None or n > len(tokens) or (n and tokens[n - 1] != hist.doc[-1]):
            start = hist.output_start if hist is not None else max(len(tokens) - 1, 0)
            hist = self._requests[rid] = _History(self.depth, start)
            n = 0
        for i in range(n, len(tokens)):
            hist.trie.append(hist.doc, hist.active, tokens[i])
        return hist

    def finish(self, request_id: str) -> None:
        """Move the request's output (or whole history) into the shared trie, evicting the
        oldest cached documents beyond max_cached_requests."""
        hist = self._requests.pop(request_id, None)
        if hist is None or self.max_cached_requests == 0:
            return
        doc = hist.doc if self.cache_prompts else hist.doc[hist.output_start:]
        if doc:
            self._cached.append(self._shared.insert(doc))
        while len(self._cached) > self.max_cached_requests:
            self._shared.remove(self._cached.popleft())
