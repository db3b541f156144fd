"""POST /v1/completions: one or more prompts (text or token ids) x n choices.

Every prompt is tokenized (on the tokenizer pool) and validated before any is queued, so a
bad one is a 400 that leaves the engine untouched. Choice `index` follows OpenAI's order:
prompt i, sample j -> i * n + j; a stream sends one choice per chunk. `suffix` builds a
fill-in-the-middle prompt for models with FIM tokens. `echo` with `max_tokens: 0` scores
the prompt (its logprobs) without generating: the engine samples one token, not shown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from tandem.outputs import CompletionOutput, RequestOutput
from tandem.request import SamplingParams
from tandem.server.errors import APIError
from tandem.server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                    CompletionResponse, make_usage)
from tandem.server.serving import (SSE_HEADERS, ServerState, StreamWriter, admit,
                                   cancel_on_disconnect, check_model, completion_logprobs,
                                   first_output, log_request, merge, new_id,
                                   prompt_logprobs_entries, resolve_max_tokens, sse,
                                   sse_stream)

logger = logging.getLogger("tandem.server")
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")


def _prompts(body: CompletionRequest) -> list[str | list[int]]:
    p = body.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        return [p]
    if not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    return list(p)


def fim_prompt(state: ServerState, prompt: str | list[int], suffix: str) -> str:
    tok = state.engine.tokenizer
    missing = [t for t in FIM_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise APIError(400, f"suffix (fill-in-the-middle) needs the FIM tokens {missing}, "
                            f"which model `{state.model_name}` does not have", param="suffix")
    if not isinstance(prompt, str):
        raise APIError(400, "suffix needs a text prompt, not token ids", param="suffix")
    return f"{FIM_TOKENS[0]}{prompt}{FIM_TOKENS[1]}{suffix}{FIM_TOKENS[2]}"


@dataclass(slots=True)
class _Prepared:
    request_id: str
    text: str | None
    token_ids: list[int]
    params: SamplingParams


def _tokenize(state: ServerState, body: CompletionRequest,
              prompt: str | list[int]) -> tuple[str | None, list[int]]:
    """Tokenizer pool: the prompt's (text, ids), truncated as asked."""
    inputs = state.engine.inputs
    if isinstance(prompt, str):
        text, ids = prompt, inputs.encode_text(prompt, add_special_tokens=body.add_special_tokens
                                               is not False)
    else:
        text, ids = inputs.tokenize_prompt(prompt)
    if body.truncate_prompt_tokens is not None and len(ids) > body.truncate_prompt_tokens:
        text, ids = None, ids[-body.truncate_prompt_tokens:]
    return text, ids


async def create_completion(body: CompletionRequest, raw: Request,
                            state: ServerState) -> Response:
    check_model(state, body.model)
    engine = state.engine
    n = 1 if body.n is None else body.n
    if body.best_of is not None and body.best_of != n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    echo = bool(body.echo)
    score_only = echo and body.max_tokens == 0  # legacy scoring: prompt logprobs only
    prompts = _prompts(body)
    admit(state, len(prompts), n)
    if body.suffix is not None:
        if echo:
            raise APIError(400, "echo is not supported together with suffix", param="echo")
        prompts = [fim_prompt(state, p, body.suffix) for p in prompts]
    arrival = time.time()
    rid = new_id("cmpl")
    defaults = engine.inputs.sampling_defaults
    asked = 1 if score_only else body.max_tokens
    if "max_tokens" not in body.model_fields_set and "max_tokens" in defaults:
        asked = defaults["max_tokens"]
    prompt_lp = body.prompt_logprobs
    if echo and body.logprobs is not None:
        prompt_lp = max(prompt_lp or 0, body.logprobs)
    prepared = []
    for i, p in enumerate(prompts):  # everything is validated before anything is queued
        text, ids = await engine.run_blocking(_tokenize, state, body, p)
        max_tokens = resolve_max_tokens(len(ids), asked, engine.max_model_len)
        params = body.to_sampling_params(max_tokens, defaults, logprobs=body.logprobs,
                                         prompt_logprobs=prompt_lp)
        engine.prepare({"prompt": text, "prompt_token_ids": ids}, params)
        prepared.append(_Prepared(f"{rid}-{i}", text, ids, params))
    _log_ignored(body, rid)
    log_request(state, rid, [len(p.token_ids) for p in prepared], prepared[0].params,
                body.user)
    gens = [engine.generate(p.request_id, {"prompt": p.text, "prompt_token_ids": p.token_ids},
                            p.params, arrival) for p in prepared]
    merged = merge(gens)
    if body.stream:
        first = await cancel_on_disconnect(raw, first_output(merged))
        writer = _StreamWriter(state, body, rid, n, len(prompts), score_only)
        return StreamingResponse(sse_stream(writer, first, merged),
                                 media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(writer.abort_unfinished, prepared))

    finals: dict[int, RequestOutput] = {}

    async def collect() -> None:  # the deltas of each prompt, merged into its final output
        async for i, out in merged:
            finals[i] = finals[i].merge(out) if i in finals else out

    await cancel_on_disconnect(raw, collect())
    choices = [_choice(state, body, out, c, i * n + c.index, score_only)
               for i, out in sorted(finals.items()) for c in out.outputs]
    failed = [c.index for c in choices if c.finish_reason == "error"]
    if failed:
        raise APIError(500, f"the engine failed while generating choice(s) {failed}; see the "
                            f"server log", code="engine_error")
    resp = CompletionResponse(id=rid, model=state.model_name, choices=choices,
                              usage=_usage(finals.values(), score_only))
    return JSONResponse(resp.model_dump())


def _log_ignored(body: CompletionRequest, rid: str) -> None:
    if ignored := body.ignored_fields():
        logger.warning("request %s: unknown fields ignored: %s", rid, ignored)


def _usage(finals, score_only: bool, generated: int | None = None):
    """Usage of the final outputs; `generated` when they are the last deltas only."""
    finals = list(finals)
    if generated is None:
        generated = sum(len(c.token_ids) for o in finals for c in o.outputs)
    return make_usage(sum(len(o.prompt_token_ids) for o in finals),
                      0 if score_only else generated, sum(o.num_cached_tokens for o in finals))


def _prompt_text(state: ServerState, out: RequestOutput) -> str:
    if out.prompt is not None:
        return out.prompt
    return state.engine.tokenizer.decode(out.prompt_token_ids)


def _echo_logprobs(state: ServerState, body: CompletionRequest,
                   out: RequestOutput) -> tuple[CompletionLogprobs, int]:
    entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    return completion_logprobs(state.engine.tokenizer, out.prompt_token_ids, entries,
                               body.logprobs, 0, bool(body.return_tokens_as_token_ids))


def _prompt_logprobs(state: ServerState, body: CompletionRequest, out: RequestOutput):
    if body.prompt_logprobs is None or out.prompt_logprobs is None:
        return None
    return prompt_logprobs_entries(state.engine.tokenizer, out.prompt_token_ids,
                                   out.prompt_logprobs, body.prompt_logprobs)


def _choice(state: ServerState, body: CompletionRequest, out: RequestOutput,
            c: CompletionOutput, index: int, score_only: bool) -> CompletionChoice:
    echo = bool(body.echo)
    text = (_prompt_text(state, out) if echo else "") + ("" if score_only else c.text)
    logprobs = None
    if body.logprobs is not None:
        logprobs, offset = _echo_logprobs(state, body, out) if echo else (CompletionLogprobs(), 0)
        if not score_only:
            gen, _ = completion_logprobs(state.engine.tokenizer, c.token_ids, c.logprobs or [],
                                         body.logprobs, offset,
                                         bool(body.return_tokens_as_token_ids))
            _extend(logprobs, gen)
    ids = bool(body.return_token_ids)
    return CompletionChoice(index=index, text=text, logprobs=logprobs,
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                            prompt_logprobs=_prompt_logprobs(state, body, out),
                            prompt_token_ids=list(out.prompt_token_ids) if ids else None,
                            token_ids=list(c.token_ids) if ids else None)


def _plain(index: int, text: str, finish_reason: str | None,
           stop_reason: int | str | None = None) -> dict:
    """A CompletionChoice without logprobs, as the dict its JSON is made of."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
            "stop_reason": stop_reason, "prompt_logprobs": None}


def _extend(a: CompletionLogprobs, b: CompletionLogprobs) -> None:
    a.tokens += b.tokens
    a.token_logprobs += b.token_logprobs
    a.top_logprobs += b.top_logprobs
    a.text_offset += b.text_offset


@dataclass(slots=True)
class _ChoiceState:
    offset: int = 0  # text_offset of the next token (logprobs)
    started: bool = False
    sent_prompt: bool = False  # return_token_ids: the prompt's ids went out


class _StreamWriter(StreamWriter):
    """The merged delta outputs as `text_completion` chunks, one choice each, then usage."""

    def __init__(self, state: ServerState, body: CompletionRequest, rid: str, n: int,
                 num_prompts: int, score_only: bool) -> None:
        super().__init__(state, rid, num_prompts * n, "text_completion", body.continuous_usage,
                         bool(body.return_token_ids))
        self.body, self.n, self.score_only = body, n, score_only
        self.choices: dict[int, _ChoiceState] = {}
        self.finals: dict[int, RequestOutput] = {}  # each prompt's last (delta) output
        self.generated = 0  # tokens generated over all choices

    def finish_chunk(self, index: int, reason: str) -> str:
        return self.chunk(_plain(index, "", reason))

    async def events(self, first: tuple[int, RequestOutput],
                     rest: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        for chunk in self._on_output(*first, force=True):
            yield chunk
        async for i, out in rest:
            for chunk in self._on_output(i, out, force=False):
                yield chunk
        if self.body.include_usage:
            yield sse(CompletionResponse(id=self.rid, created=self.created,
                                         model=self.state.model_name, choices=[],
                                         usage=_usage(self.finals.values(), self.score_only,
                                                      self.generated)))

    def _on_output(self, i: int, out: RequestOutput, force: bool) -> list[str]:
        self.generated += sum(len(c.token_ids) for c in out.outputs)
        for c in out.outputs:
            self.took(i * self.n + c.index, len(out.prompt_token_ids),
                      [] if self.score_only else c.token_ids)
        if out.finished:
            self.finals[i] = out
        chunks = [self.chunk(ch) for c in out.outputs
                  if (ch := self._delta(out, c, i * self.n + c.index))]
        if not chunks and force:  # the first event leaves with the first token
            index = i * self.n + out.outputs[0].index
            chunks = [self.chunk(self._ids(_plain(index, "", None), out, index))]
        return chunks

    def _ids(self, choice: CompletionChoice | dict, out: RequestOutput,
             index: int) -> CompletionChoice | dict:
        """`with_ids`, and the prompt's ids with the choice's first chunk."""
        if not self.return_token_ids:
            return choice
        st = self.choices.setdefault(index, _ChoiceState())
        if st.sent_prompt:
            return self.with_ids(choice, index)
        st.sent_prompt = True
        return self.with_ids(choice, index, prompt_token_ids=list(out.prompt_token_ids))

    def _delta(self, out: RequestOutput, c: CompletionOutput,
               index: int) -> CompletionChoice | dict | None:
        if index in self.ended:
            return None
        st = self.choices.setdefault(index, _ChoiceState())
        body = self.body
        text = "" if self.score_only else c.text
        new_ids = [] if self.score_only else c.token_ids
        logprobs = prompt_lps = None
        if not st.started:
            prompt_lps = _prompt_logprobs(self.state, body, out)
            if body.echo:
                text = _prompt_text(self.state, out) + text
                if body.logprobs is not None:
                    logprobs, st.offset = _echo_logprobs(self.state, body, out)
        if body.logprobs is not None and new_ids:
            gen, st.offset = completion_logprobs(
                self.state.engine.tokenizer, new_ids, c.logprobs or [],
                body.logprobs, st.offset, bool(body.return_tokens_as_token_ids))
            logprobs = gen if logprobs is None else (_extend(logprobs, gen) or logprobs)
        if not text and logprobs is None and c.finish_reason is None and prompt_lps is None:
            return None
        st.started = True
        self.ended_choice(index, c.finish_reason)
        if logprobs is None and prompt_lps is None:  # the common case, without pydantic
            return self._ids(_plain(index, text, c.finish_reason, c.stop_reason), out, index)
        return self._ids(CompletionChoice(index=index, text=text, logprobs=logprobs,
                                          finish_reason=c.finish_reason,
                                          stop_reason=c.stop_reason,
                                          prompt_logprobs=prompt_lps), out, index)

    def abort_unfinished(self, prepared: list[_Prepared]) -> None:
        """Background task after the response: abort what did not finish (disconnects)."""
        for i, p in enumerate(prepared):
            if i not in self.finals:
                self.state.engine.abort(p.request_id)
