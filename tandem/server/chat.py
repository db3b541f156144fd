"""POST /v1/chat/completions: messages -> the model's chat template -> one request, n choices.

A model without a chat template (and no --chat-template) is a 400 that says so. Streams
open with a {"role": "assistant"} delta per choice, then content deltas; the last chunk of
a choice carries its finish_reason.
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
from tandem.server.errors import APIError
from tandem.server.protocol import (MAX_LOGPROBS, AssistantMessage, ChatChoice,
                                    ChatCompletionChunk, ChatCompletionRequest,
                                    ChatCompletionResponse, ChatLogprobs, ChatMessage,
                                    ChatStreamChoice, make_usage)
from tandem.server.serving import (SSE_HEADERS, ServerState, cancel_on_disconnect,
                                   chat_logprobs, check_model, engine_failure, first_output, merge, new_id,
                                   resolve_max_tokens, sse, sse_stream)


def render_chat(state: ServerState, messages: list[ChatMessage],
                add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    """(prompt text, token ids) of a conversation; ValueError (a 400) without a template."""
    tok = state.engine.tokenizer
    text = tok.apply_chat_template([m.to_template() for m in messages], add_generation_prompt)
    return text, tok.encode(text, add_special_tokens=False)


def _num_logprobs(body: ChatCompletionRequest) -> int | None:
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {MAX_LOGPROBS}], got "
                                f"{body.top_logprobs}", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


async def create_chat_completion(body: ChatCompletionRequest, raw: Request,
                                 state: ServerState) -> Response:
    check_model(state, body.model)
    engine = state.engine
    n = 1 if body.n is None else body.n
    text, ids = render_chat(state, body.messages, body.add_generation_prompt is not False)
    asked = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    max_tokens = resolve_max_tokens(len(ids), asked, engine.max_model_len, "messages")
    params = body.to_sampling_params(max_tokens, logprobs=_num_logprobs(body))
    prompt = {"prompt": text, "prompt_token_ids": ids}
    engine.prepare(prompt, params)
    rid = new_id("chatcmpl")
    merged = merge([engine.generate(rid, prompt, params, time.time())])
    if body.stream:
        try:
            first = await cancel_on_disconnect(raw, first_output(merged))
        except (EngineError, EngineStopped) as e:
            raise engine_failure(e) from e
        writer = _ChatStreamWriter(state, body, rid, n)
        return StreamingResponse(sse_stream(writer.events(first[1], merged), merged),
                                 media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(writer.abort_unfinished))

    async def last() -> RequestOutput:
        async for _, out in merged:
            if out.finished:
                return out
        raise EngineError("the request ended without a final output")

    try:
        out = await cancel_on_disconnect(raw, last())
    except (EngineError, EngineStopped) as e:
        raise engine_failure(e) from e
    choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                          logprobs=_logprobs(state, body, c, 0),
                          finish_reason=c.finish_reason) for c in out.outputs]
    usage = make_usage(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs),
                       out.num_cached_tokens)
    resp = ChatCompletionResponse(id=rid, model=state.model_name, choices=choices, usage=usage)
    return JSONResponse(resp.model_dump())


def _logprobs(state: ServerState, body: ChatCompletionRequest, c: CompletionOutput,
              start: int) -> ChatLogprobs | None:
    """Chat-format logprobs of c's tokens from `start` on (None when not asked)."""
    if not body.logprobs:
        return None
    entries = (c.logprobs or [])[start:]
    return ChatLogprobs(content=chat_logprobs(state.engine.tokenizer, c.token_ids[start:],
                                              entries, body.top_logprobs or 0))


@dataclass(slots=True)
class _ChoiceState:
    text: int = 0  # characters of content sent
    tokens: int = 0  # tokens whose logprobs were sent
    done: bool = False


class _ChatStreamWriter:
    def __init__(self, state: ServerState, body: ChatCompletionRequest, rid: str,
                 n: int) -> None:
        self.state, self.body, self.rid, self.n = state, body, rid, n
        self.created = int(time.time())
        self.choices = [_ChoiceState() for _ in range(n)]
        self.final: RequestOutput | None = None
        self.exclude = None if body.include_usage else {"usage"}

    def _chunk(self, choices: list[ChatStreamChoice]) -> str:
        return sse(ChatCompletionChunk(id=self.rid, created=self.created,
                                       model=self.state.model_name, choices=choices),
                   exclude=self.exclude)

    async def events(self, first: RequestOutput,
                     rest: AsyncGenerator[tuple[int, RequestOutput], None]
                     ) -> AsyncGenerator[str, None]:
        yield self._chunk([ChatStreamChoice(index=i, delta={"role": "assistant",
                                                            "content": ""})
                           for i in range(self.n)])
        chunk = self._on_output(first)
        if chunk:
            yield chunk
        async for _, out in rest:
            chunk = self._on_output(out)
            if chunk:
                yield chunk
        if self.body.include_usage and self.final is not None:
            f = self.final
            usage = make_usage(len(f.prompt_token_ids),
                               sum(len(c.token_ids) for c in f.outputs), f.num_cached_tokens)
            yield sse(ChatCompletionChunk(id=self.rid, created=self.created,
                                          model=self.state.model_name, choices=[],
                                          usage=usage))

    def _on_output(self, out: RequestOutput) -> str | None:
        if out.finished:
            self.final = out
        choices = [ch for c in out.outputs if (ch := self._delta(c))]
        return self._chunk(choices) if choices else None

    def _delta(self, c: CompletionOutput) -> ChatStreamChoice | None:
        st = self.choices[c.index]
        if st.done:
            return None
        text = c.text[st.text:]
        logprobs = _logprobs(self.state, self.body, c, st.tokens)
        if logprobs is not None and not logprobs.content:
            logprobs = None
        if not text and logprobs is None and c.finish_reason is None:
            return None
        st.text, st.tokens, st.done = len(c.text), len(c.token_ids), c.finish_reason is not None
        return ChatStreamChoice(index=c.index, delta={"content": text} if text else {},
                                logprobs=logprobs, finish_reason=c.finish_reason)

    def abort_unfinished(self) -> None:
        if self.final is None:
            self.state.engine.abort(self.rid)
