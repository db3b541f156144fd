"""POST /v1/completions: one or more prompts (text or token ids) x n choices.

Every prompt is tokenized and validated before any is queued, so a bad one is a 400 that
leaves the engine untouched. Choice `index` follows OpenAI's order: prompt i, sample j ->
i * n + j. `suffix` builds a fill-in-the-middle prompt for models with FIM tokens.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from tandem.engine.async_engine import EngineError, EngineStopped
from tandem.outputs import CompletionOutput, RequestOutput
from tandem.request import SamplingParams
from tandem.server.errors import APIError
from tandem.server.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest,
                                    CompletionResponse, make_usage)
from tandem.server.serving import (SSE_HEADERS, ServerState, cancel_on_disconnect,
                                   check_model, completion_logprobs, engine_failure, first_output, merge,
                                   new_id, resolve_max_tokens, sse, sse_stream)

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


async def create_completion(body: CompletionRequest, raw: Request,
                            state: ServerState) -> Response:
    check_model(state, body.model)
    engine = state.engine
    n = 1 if body.n is None else body.n
    if body.best_of is not None and body.best_of != n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")
    echo = bool(body.echo)
    prompts = _prompts(body)
    if body.suffix is not None:
        if echo:
            raise APIError(400, "echo is not supported together with suffix", param="echo")
        prompts = [fim_prompt(state, p, body.suffix) for p in prompts]
    arrival = time.time()
    rid = new_id("cmpl")
    prepared = []
    for i, p in enumerate(prompts):  # everything is validated before anything is queued
        text, ids = engine.tokenize(p)
        max_tokens = resolve_max_tokens(len(ids), body.max_tokens, engine.max_model_len)
        params = body.to_sampling_params(
            max_tokens, logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if echo and body.logprobs is not None else None)
        engine.prepare({"prompt": text, "prompt_token_ids": ids}, params)
        prepared.append(_Prepared(f"{rid}-{i}", text, ids, params))
    gens = [engine.generate(p.request_id, {"prompt": p.text, "prompt_token_ids": p.token_ids},
                            p.params, arrival) for p in prepared]
    merged = merge(gens)
    if body.stream:
        try:
            first = await cancel_on_disconnect(raw, first_output(merged))
        except (EngineError, EngineStopped) as e:
            raise engine_failure(e) from e
        writer = _StreamWriter(state, body, rid, n, echo)
        return StreamingResponse(sse_stream(writer.events(first, merged), merged), media_type="text/event-stream",
                                 headers=SSE_HEADERS,
                                 background=BackgroundTask(writer.abort_unfinished, prepared))

    finals: dict[int, RequestOutput] = {}

    async def collect() -> None:
        async for i, out in merged:
            if out.finished:
                finals[i] = out

    try:
        await cancel_on_disconnect(raw, collect())
    except (EngineError, EngineStopped) as e:
        raise engine_failure(e) from e
    choices = []
    for i in sorted(finals):
        out = finals[i]
        for c in out.outputs:
            choices.append(_choice(state, body, out, c, i * n + c.index, echo))
    usage = make_usage(sum(len(o.prompt_token_ids) for o in finals.values()),
                       sum(len(c.token_ids) for o in finals.values() for c in o.outputs),
                       sum(o.num_cached_tokens for o in finals.values()))
    resp = CompletionResponse(id=rid, model=state.model_name, choices=choices, usage=usage)
    return JSONResponse(resp.model_dump())


def _prompt_text(state: ServerState, out: RequestOutput) -> str:
    if out.prompt is not None:
        return out.prompt
    return state.engine.tokenizer.decode(out.prompt_token_ids)


def _choice(state: ServerState, body: CompletionRequest, out: RequestOutput,
            c: CompletionOutput, index: int, echo: bool) -> CompletionChoice:
    tok = state.engine.tokenizer
    text = (_prompt_text(state, out) if echo else "") + c.text
    logprobs = None
    if body.logprobs is not None:
        logprobs, offset = CompletionLogprobs(), 0
        if echo:
            entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            logprobs, offset = completion_logprobs(tok, out.prompt_token_ids, entries,
                                                   body.logprobs, 0)
        gen, _ = completion_logprobs(tok, c.token_ids, c.logprobs or [], body.logprobs, offset)
        _extend(logprobs, gen)
    return CompletionChoice(index=index, text=text, logprobs=logprobs,
                            finish_reason=c.finish_reason)


def _extend(a: CompletionLogprobs, b: CompletionLogprobs) -> None:
    a.tokens += b.tokens
    a.token_logprobs += b.token_logprobs
    a.top_logprobs += b.top_logprobs
    a.text_offset += b.text_offset


@dataclass(slots=True)
class _ChoiceState:
    text: int = 0  # characters of the choice's text already sent
    tokens: int = 0  # tokens already covered by sent logprobs
    offset: int = 0  # text_offset of the next token (logprobs)
    started: bool = False
    done: bool = False


class _StreamWriter:
    """Turns the merged outputs into `text_completion` chunks, then usage, then [DONE]."""

    def __init__(self, state: ServerState, body: CompletionRequest, rid: str, n: int,
                 echo: bool) -> None:
        self.state, self.body, self.rid, self.n, self.echo = state, body, rid, n, echo
        self.created = int(time.time())
        self.choices: dict[int, _ChoiceState] = {}
        self.finals: dict[int, RequestOutput] = {}
        self.exclude = None if body.include_usage else {"usage"}

    def _chunk(self, choices: list[CompletionChoice]) -> str:
        return sse(CompletionResponse(id=self.rid, created=self.created,
                                      model=self.state.model_name, choices=choices),
                   exclude=self.exclude)

    async def events(self, first: tuple[int, RequestOutput],
                     rest: AsyncGenerator[tuple[int, RequestOutput], None]
                     ) -> AsyncGenerator[str, None]:
        chunk = self._on_output(*first, force=True)
        if chunk:
            yield chunk
        async for i, out in rest:
            chunk = self._on_output(i, out, force=False)
            if chunk:
                yield chunk
        if self.body.include_usage:
            f = self.finals.values()
            usage = make_usage(sum(len(o.prompt_token_ids) for o in f),
                               sum(len(c.token_ids) for o in f for c in o.outputs),
                               sum(o.num_cached_tokens for o in f))
            yield sse(CompletionResponse(id=self.rid, created=self.created,
                                         model=self.state.model_name, choices=[],
                                         usage=usage))

    def _on_output(self, i: int, out: RequestOutput, force: bool) -> str | None:
        if out.finished:
            self.finals[i] = out
        choices = [ch for c in out.outputs if (ch := self._delta(out, c, i * self.n + c.index))]
        if not choices and force:  # the first event leaves with the first token
            c = out.outputs[0]
            choices = [CompletionChoice(index=i * self.n + c.index, text="")]
        return self._chunk(choices) if choices else None

    def _delta(self, out: RequestOutput, c: CompletionOutput,
               index: int) -> CompletionChoice | None:
        st = self.choices.setdefault(index, _ChoiceState())
        if st.done:
            return None
        tok = self.state.engine.tokenizer
        text = c.text[st.text:]
        logprobs = None
        k = self.body.logprobs
        if not st.started and self.echo:
            text = _prompt_text(self.state, out) + text
            if k is not None:
                entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                logprobs, st.offset = completion_logprobs(tok, out.prompt_token_ids, entries,
                                                          k, 0)
        new_ids = c.token_ids[st.tokens:]
        if k is not None and new_ids:
            gen, st.offset = completion_logprobs(tok, new_ids, (c.logprobs or [])[st.tokens:],
                                                 k, st.offset)
            logprobs = gen if logprobs is None else (_extend(logprobs, gen) or logprobs)
        if not text and logprobs is None and c.finish_reason is None:
            return None
        st.text, st.tokens, st.started = len(c.text), len(c.token_ids), True
        st.done = c.finish_reason is not None
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=c.finish_reason)

    def abort_unfinished(self, prepared: list[_Prepared]) -> None:
        """Background task after the response: abort what did not finish (disconnects)."""
        for i, p in enumerate(prepared):
            if i not in self.finals:
                self.state.engine.abort(p.request_id)
