"""The `draft_model` proposer: a second, smaller model with the target's tokenizer guesses
k tokens greedily, one batched forward per guess, on its own paged KV cache.

    call     for each request: the tokens it has not seen (the prompt on the first call,
             then the tokens emitted since), one batched forward -> guess 1;
             then k - 1 one-token forwards of the whole batch -> guesses 2..k
    cache    its own block pool; per request the tokens whose K/V it holds. A history that
             diverges from them (guesses rejected) is re-fed from the first difference, its
             K/V overwriting the stale slots: nothing to roll back explicitly.

    positions   | 0 .......... n-1 | n   n+1 ... n+k-2 |
    draft K/V   | the history      | guesses 1..k-1    |  (guess k is never fed)

A request stops guessing early once the draft gives its guess less than MIN_PROB (most
such guesses are rejected; each costs a draft forward and a verified row). At temperature 0
guesses are the draft's argmax (one-hot); at temperature > 0 they are sampled from the
draft's q (the target's transforms; seeded requests from their own stream) and q is kept
for the p/q acceptance rule (verify.accept_pq). The pool holds as many blocks as the target's
(so any request the target can hold fits), allocated on the first call; a request that
finds it full gets no guesses that step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tandem.config import SpeculativeConfig
from tandem.layers.attention_metadata import AttentionMetadata
from tandem.models.loader import load_model
from tandem.request import SamplingParams
from tandem.runner.kv_memory import LayerKVSpec, allocate_kv_caches, kv_block_bytes
from tandem.runner.sampler import row_seed, sampling_probs, seeded_generator
from tandem.spec_decode.proposer import Proposer


_GREEDY = SamplingParams(temperature=0.0)
_DRAFT_SALT = 0x68E31DA4  # the draft's own (seed, position) stream


class DraftModelProposer(Proposer):
    MIN_PROB = 0.3  # stop guessing (for that request) below this draft probability

    def __init__(self, config: SpeculativeConfig, engine_config: Any, runner: Any) -> None:
        model_dir = config.model
        if model_dir is None:
            from tandem.assets import default_draft_model_dir, default_model_dir
            import os
            if os.path.realpath(engine_config.model.model) != os.path.realpath(
                    default_model_dir()):
                raise ValueError("speculative_config method 'draft_model' needs 'model' "
                                 "(the draft's directory) for any model but the embedded one")
            model_dir = default_draft_model_dir()
        self.runner = runner
        self.device, self.dtype = runner.device, runner.dtype
        self.model = load_model(model_dir, self.dtype, self.device)
        if self.model.vocab_size != runner.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({self.model.vocab_size}) is not "
                             f"the target's ({runner.vocab_size})")
        self.block_size = runner.block_size
        self._free: list[int] = []
        self._blocks: dict[str, list[int]] = {}  # request id -> its draft blocks
        self._seen: dict[str, list[int]] = {}  # request id -> tokens whose K/V it holds
        # request id -> (its last guesses, their q rows when sampled at temperature > 0)
        self._last: dict[str, tuple[list[int], torch.Tensor | None]] = {}
        self._q: dict[str, list[torch.Tensor]] = {}
        self._ready = False

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of the draft's KV cache (the runner sizes both pools)."""
        m = self.model
        return kv_block_bytes([LayerKVSpec(self.dtype)] * m.num_layers, self.block_size,
                              m.num_kv_heads, m.head_dim)

    def allocate(self, num_blocks: int) -> None:
        """The draft's pool, as many blocks as the target's (the runner counted both in the
        memory it sized the target's pool from)."""
        self._allocate(num_blocks)

    def _allocate(self, num: int | None = None) -> None:
        num = num or max(self.runner.num_blocks, 1)
        caches = allocate_kv_caches(self.model.num_layers, num, self.block_size,
                                    self.model.num_kv_heads, self.model.head_dim, self.dtype,
                                    self.device)
        for layer, cache in zip(self.model.attention_layers(), caches):
            layer.kv_cache, layer.kv_scale = cache, (1.0, 1.0)
        self._free = list(range(num - 1, -1, -1))
        self._ready = True

    def _reserve(self, rid: str, num_tokens: int) -> bool:
        blocks = self._blocks.setdefault(rid, [])
        need = -(-num_tokens // self.block_size) - len(blocks)
        if need > len(self._free):
            return False
        for _ in range(need):
            blocks.append(self._free.pop())
        return True

    def step_cost(self, rows: int) -> float:
        """Seconds of one draft forward over `rows` one-token queries (start-up profile)."""
        from tandem.runner.model_runner import _best_time
        if not self._ready:
            self._allocate()
        rids = [f"__profile{i}" for i in range(rows)]
        for rid in rids:
            if not self._reserve(rid, 1):
                break
        else:
            t = _best_time(lambda: self._forward(rids, [[0]] * rows, [0] * rows))
            for rid in rids:
                self.finish(rid)
            return t
        for rid in rids:
            self.finish(rid)
        return 0.0

    def _params(self, rid: str):
        state = self.runner.states.get(rid)
        return state.params if state is not None else _GREEDY

    def draft_probs(self, rid: str, drafts: Sequence[int]) -> torch.Tensor | None:
        """The q rows of `drafts` if they are the guesses last sampled for `rid` (k, V);
        None for one-hot (argmax) guesses."""
        guess, q = self._last.get(rid, ((), None))
        if q is None or list(guess[:len(drafts)]) != list(drafts):
            return None
        return q[:len(drafts)]

    def finish(self, request_id: str) -> None:
        self._free += reversed(self._blocks.pop(request_id, []))
        self._seen.pop(request_id, None)
        self._last.pop(request_id, None)

    def _slot(self, rid: str, pos: int) -> int:
        return self._blocks[rid][pos // self.block_size] * self.block_size + \
            pos % self.block_size

    @torch.inference_mode()
    def _forward(self, rids: list[str], feeds: list[list[int]], starts: list[int]
                 ) -> tuple[list[int], list[float]]:
        """Feed each request its tokens at positions start.., return the argmax after each
        request's last fed token, and its probability under the draft."""
        ids, pos, slots, qstart = [], [], [], [0]
        for rid, feed, start in zip(rids, feeds, starts):
            ids += feed
            pos += range(start, start + len(feed))
            slots += [self._slot(rid, p) for p in range(start, start + len(feed))]
            qstart.append(qstart[-1] + len(feed))
        lens = [s + len(f) for s, f in zip(starts, feeds)]
        width = max(len(self._blocks[r]) for r in rids)
        tables = [self._blocks[r] + [0] * (width - len(self._blocks[r])) for r in rids]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qstart, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            query_lens_cpu=[len(f) for f in feeds], seq_lens_cpu=lens,
            max_query_len=max(len(f) for f in feeds), max_seq_len=max(lens),
            block_size=self.block_size)
        hidden = self.model(torch.tensor(ids, dtype=torch.int64, device=dev),
                            torch.tensor(pos, dtype=torch.int64, device=dev), meta)
        last = torch.tensor(qstart[1:], device=dev) - 1
        logits = self.model.compute_logits(hidden[last]).float()
        probs = logits.softmax(dim=-1)
        top, ids = probs.max(dim=-1)
        ids, top = ids.tolist(), top.tolist()
        # Requests sampling at temperature > 0 draw their guess from the draft's q (the
        # target's transforms), kept for the p/q rule (verify.accept_pq).
        hot = [j for j, r in enumerate(rids) if self._params(r).temperature > 0]
        if hot:
            params = [self._params(rids[j]) for j in hot]
            q = sampling_probs(logits[hot], params)
            for row, j in enumerate(hot):
                p = params[row]
                pos = starts[j] + len(feeds[j])  # the position this guess takes
                g = (None if p.seed is None else
                     seeded_generator(q.device, row_seed(p.seed ^ _DRAFT_SALT, pos)))
                noise = torch.empty_like(q[row]).exponential_(generator=g)
                ids[j] = int((q[row] / noise).argmax().item())
                top[j] = q[row, ids[j]].item()
                self._q.setdefault(rids[j], []).append(q[row])
        return ids, top

    def propose(self, request_ids: Sequence[str], histories: Sequence[Sequence[int]],
                k: int) -> list[list[int]]:
        if not self._ready:
            self._allocate()
        out: list[list[int]] = [[] for _ in request_ids]
        rows, feeds, starts = [], [], []
        for i, (rid, hist) in enumerate(zip(request_ids, histories)):
            if not hist or not self._reserve(rid, len(hist) + k - 1):
                continue
            seen = self._seen.get(rid, [])
            same = 0
            limit = min(len(seen), len(hist) - 1)  # the last token is always fed
            while same < limit and seen[same] == hist[same]:
                same += 1
            rows.append(i)
            feeds.append(list(hist[same:]))
            starts.append(same)
        if not rows:
            return out
        rids = [request_ids[i] for i in rows]
        self._q = {}
        first, conf = self._forward(rids, feeds, starts)
        guesses = [[g] for g in first]
        # Guessing goes on only while the draft is confident: a guess it gives less than
        # MIN_PROB is likely rejected, and costs a draft forward and a verified row.
        live = [j for j, c in enumerate(conf) if c >= self.MIN_PROB]
        for step in range(1, k):
            if not live:
                break
            nxt, conf = self._forward([rids[j] for j in live],
                                      [[guesses[j][-1]] for j in live],
                                      [len(histories[rows[j]]) + step - 1 for j in live])
            for j, t in zip(live, nxt):
                guesses[j].append(t)
            live = [j for j, c in zip(live, conf) if c >= self.MIN_PROB]
        for i, rid, g in zip(rows, rids, guesses):
            out[i] = g
            self._seen[rid] = list(histories[i]) + g[:-1]
            q = self._q.get(rid)
            self._last[rid] = (g, torch.stack(q) if q else None)
        return out
