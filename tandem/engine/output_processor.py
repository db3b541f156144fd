"""From updated `Request`s to `RequestOutput`s: detokenize, match stop strings, gather n > 1.

A user request with n samples is n scheduler requests ("0_id", "1_id", ...) under one
`ParentState`; its `RequestOutput` reports all n. Text in an unfinished output is only what
is final (see detokenizer.py), so a streaming client may send `text[len(sent):]`.

A FINAL_ONLY request without stop strings (offline `LLM.generate`) shows no text before it
finishes, so its tokens wait and go through the detokenizer when it does (or is aborted):
the same calls in the same order, made back to back while the code is in cache, instead of
one between every two steps of a decode that has just streamed the weights through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tandem.engine.detokenizer import IncrementalDetokenizer
from tandem.engine.tokenizer import Tokenizer
from tandem.outputs import (CompletionOutput, Logprob, Logprobs, RequestMetrics, RequestOutput,
                            StepPlan, StepResult, TokenLogprobs)
from tandem.request import FinishReason, Request, RequestOutputKind


@dataclass(slots=True)
class ChildState:
    request: Request
    index: int
    detok: IncrementalDetokenizer | None
    logprobs: list[TokenLogprobs] | None
    num_seen: int = 0  # output tokens already passed to the detokenizer
    num_sent: int = 0  # output tokens already handed out (DELTA outputs)
    deferred: bool = False  # detokenized when it finishes (see the module docstring)


@dataclass(slots=True)
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[ChildState]
    prompt_logprobs: list[TokenLogprobs | None] | None
    metrics: RequestMetrics
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE


def _stop_token(req: Request) -> bool:
    """Whether req finished on a stop token whose text is left out: the scheduler's STOP
    (scheduler._stop_reason) for EOS or a stop_token_ids token, its last output token."""
    p = req.sampling_params
    if req.finish_reason is not FinishReason.STOP or p.include_stop_str_in_output:
        return False
    token = req.output_token_ids[-1]
    return token in p.stop_token_ids or (token in req.eos_token_ids and not p.ignore_eos)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None,
                 finish: Callable[[str, FinishReason], object]) -> None:
        self.tokenizer = tokenizer
        self.finish = finish  # scheduler.finish_request: ends a request a stop string matched
        self.parents: dict[str, ParentState] = {}
        # scheduler request id -> (its user request, its own state)
        self.child_to_parent: dict[str, tuple[ParentState, ChildState]] = {}

    def add(self, request_id: str, prompt: str | None, children: list[Request]) -> ParentState:
        first = children[0]
        p = first.sampling_params
        parent = ParentState(
            request_id, prompt, first.prompt_token_ids,
            [ChildState(r, i, IncrementalDetokenizer(self.tokenizer, r.prompt_token_ids,
                                                     r.sampling_params)
                        if self.tokenizer is not None and p.detokenize else None,
                        [] if p.logprobs is not None else None)
             for i, r in enumerate(children)],
            [None] * len(first.prompt_token_ids) if p.prompt_logprobs is not None else None,
            RequestMetrics(arrival_time=first.arrival_time), p.output_kind)
        self.parents[request_id] = parent
        for c in parent.children:
            self.child_to_parent[c.request.request_id] = (parent, c)
            c.deferred = (c.detok is not None and not c.detok.stop
                          and p.output_kind is RequestOutputKind.FINAL_ONLY)
        return parent

    def remove(self, request_id: str) -> None:
        """Forget a request that was never queued."""
        parent = self.parents.pop(request_id)
        for c in parent.children:
            self.child_to_parent.pop(c.request.request_id, None)

    def process(self, plan: StepPlan, result: StepResult, updated: list[Request]
                ) -> list[RequestOutput]:
        """The outputs of every parent that got a token or finished this step."""
        for i, seq in enumerate(plan.seqs):
            entry = self.child_to_parent.get(seq.request_id)
            if entry is None:
                continue
            parent, child = entry
            text = child.request.sampling_params.detokenize
            if result.logprobs and result.logprobs[i] is not None and child.logprobs is not None:
                ranks = result.logprob_ranks[i] if result.logprob_ranks else None
                child.logprobs.extend(
                    self._entry(e, t, ranks[j] if ranks else None, text)
                    for j, (e, t) in enumerate(zip(result.logprobs[i],
                                                   result.sampled_token_ids[i])))
            if result.prompt_logprobs and result.prompt_logprobs[i] is not None:
                entries = result.prompt_logprobs[i]
                ranks = result.prompt_logprob_ranks[i] if result.prompt_logprob_ranks else None
                first = seq.start_pos + 1
                targets = parent.prompt_token_ids[first:first + len(entries)]
                parent.prompt_logprobs[first:first + len(entries)] = [
                    None if e is None else self._entry(e, t, ranks[j] if ranks else None, text)
                    for j, (e, t) in enumerate(zip(entries, targets))]
        return self.outputs_of(updated)

    def _entry(self, entry: Logprobs, chosen: int, rank: int | None,
               text: bool = True) -> TokenLogprobs:
        """A position's {token id: logprob} as vLLM's {token id: Logprob}: the chosen (or
        prompt) token's rank as the sampler counted it in the whole vocabulary, each top-N
        token's from the entries above it (every token above a top-N one is in the top-N),
        and each token's text (None without `text`: detokenize=False)."""
        tok = self.tokenizer if text else None
        return {t: Logprob(lp, rank if t == chosen else 1 + sum(v > lp for v in entry.values()),
                           tok.decode([t], skip_special_tokens=False) if tok is not None
                           else None)
                for t, lp in entry.items()}

    def outputs_of(self, requests: list[Request], arrived: bool = True
                   ) -> list[RequestOutput]:
        """The outputs of the user requests of `requests` (which got tokens or finished),
        each once; FINAL_ONLY ones only once every sample is finished. arrived: whether
        their newest tokens came in this step (False: they finished without any)."""
        touched: dict[str, ParentState] = {}
        for req in requests:
            entry = self.child_to_parent.get(req.request_id)
            if entry is None:
                continue
            parent, child = entry
            if req.is_finished or not child.deferred:
                self._advance(child, arrived)
            touched[parent.request_id] = parent
        return [self._output(p) for p in touched.values()
                if p.output_kind is not RequestOutputKind.FINAL_ONLY
                or all(c.request.is_finished for c in p.children)]

    def _advance(self, child: ChildState, arrived: bool = True) -> None:
        """Feed new tokens to the detokenizer, one at a time; a matched stop string
        finishes the request. A step may bring several tokens (speculative decoding): the
        ones after the token that completed the stop string are dropped, so the output
        ends exactly where one-token steps would have ended it. Only the last token of
        a request that finished as it `arrived` flushes the detokenizer's held-back tail,
        as when every token is fed in its own step. A stop token (EOS, stop_token_ids) that
        ended the request stays in its token ids but not in its text, unless
        include_stop_str_in_output (as vLLM does)."""
        req = child.request
        new = req.output_token_ids[child.num_seen:]
        if child.detok is None:
            child.num_seen = len(req.output_token_ids)
            return
        for j, token in enumerate(new):
            child.num_seen += 1
            last = j == len(new) - 1
            flush = arrived and req.is_finished and last
            if not child.detok.add_tokens([] if flush and _stop_token(req) else [token],
                                          finished=flush):
                continue
            if not last:  # tokens past the stop string: never generated, as far as anyone sees
                del req.output_token_ids[child.num_seen:]
                if child.logprobs is not None:
                    del child.logprobs[child.num_seen:]
            if req.is_finished:  # the stop string came with the last token allowed
                req.finish_reason = FinishReason.STOP
            else:
                self.finish(req.request_id, FinishReason.STOP)
            return

    def aborted_output(self, request_id: str) -> RequestOutput | None:
        """The final output of a user request after `Engine.abort_request`."""
        parent = self.parents.get(request_id)
        if parent is None:
            return None
        for c in parent.children:  # the tokens a deferred child holds back, as they came
            self._advance(c, arrived=False)
        return self._output(parent)

    def _output(self, parent: ParentState) -> RequestOutput:
        delta = parent.output_kind is RequestOutputKind.DELTA
        outs = []
        finished = True
        for c in parent.children:
            r = c.request
            done = r.is_finished
            finished &= done
            text, stop_reason = "", None
            if c.detok is not None:
                text = c.detok.take_delta(done)
                if not delta:
                    text = c.detok.text[: c.detok.num_streamed]
                stop_reason = c.detok.stop_reason
            if done and stop_reason is None and r.finish_reason is FinishReason.STOP:
                last = r.output_token_ids[-1] if r.output_token_ids else None
                stop_reason = last if last in r.sampling_params.stop_token_ids else None
            # A delta copies only the new tokens: copying every token every step would
            # make a long stream quadratic.
            start = c.num_sent if delta else 0
            token_ids = r.output_token_ids[start:]
            lps = c.logprobs[start:] if c.logprobs is not None else None
            c.num_sent = len(r.output_token_ids)
            cum = (sum(d[t].logprob for d, t in zip(c.logprobs, r.output_token_ids))
                   if c.logprobs and done else None)
            outs.append(CompletionOutput(
                c.index, text, token_ids,
                r.finish_reason.value if done and r.finish_reason else None,
                stop_reason, lps, cum))
        m = parent.metrics
        firsts = [c.request.first_token_time for c in parent.children if c.request.first_token_time]
        m.first_token_time = min(firsts) if firsts else None
        if finished:
            m.finished_time = max(c.request.finish_time or 0.0 for c in parent.children)
            self.parents.pop(parent.request_id, None)
            for c in parent.children:
                self.child_to_parent.pop(c.request.request_id, None)
        cached = max(parent.children[0].request.num_cached_tokens, 0)
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids,
                             parent.prompt_logprobs, outs, finished, m, cached, delta)
