"""POST /v1/chat/completions: messages -> the model's chat template -> one request, n choices.

A model without a chat template (and no --chat-template or request `chat_template`) is a
400 that says so. Rendering and tokenizing run on the tokenizer pool. Streams open with a
{"role": "assistant"} delta per choice, then content deltas, one choice per chunk; the last
chunk of a choice carries its finish_reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from tandem.engine.async_engine import EngineError
from tandem.engine.tokenizer import TEMPLATE_RESERVED
from tandem.outputs import CompletionOutput, RequestOutput
from tandem.server.errors import APIError
from tandem.server.protocol import (AssistantMessage, ChatChoice, ChatCompletionChunk,
                                    ChatCompletionRequest, ChatCompletionResponse,
                                    ChatLogprobs, ChatMessage, ChatStreamChoice, make_usage)
from tandem.server.serving import (SSE_HEADERS, ServerState, StreamWriter, admit,
                                   cancel_on_disconnect, chat_logprobs, check_model,
                                   first_output, log_request, merge, new_id,
                                   resolve_max_tokens, sse, sse_stream)

logger = logging.getLogger("tandem.server")


def render_chat(state: ServerState, messages: list[ChatMessage],
                add_generation_prompt: bool = True, add_special_tokens: bool = False,
                chat_template: str | None = None, template_kwargs: dict | None = None,
                tools: list[dict] | None = None) -> tuple[str, list[int]]:
    """(prompt text, token ids) of a conversation; ValueError (a 400) without a template.
    Blocking: call through `AsyncEngine.run_blocking`."""
    inputs = state.engine.inputs
    if inputs.tokenizer is None:
        raise ValueError("messages: this model has no tokenizer.json, so no chat")
    reserved = TEMPLATE_RESERVED & set(template_kwargs or {})
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {sorted(reserved)}",
                       param="chat_template_kwargs")
    text = inputs.tokenizer.apply_chat_template([m.to_template() for m in messages],
                                                add_generation_prompt, chat_template,
                                                template_kwargs, tools)
    return text, inputs.encode_text(text, "messages", add_special_tokens=add_special_tokens)


def _num_logprobs(state: ServerState, body: ChatCompletionRequest) -> int | None:
    limit = state.engine.config.model.max_logprobs
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        if body.top_logprobs < 0 or (limit != -1 and body.top_logprobs > limit):
            raise APIError(400, f"top_logprobs must be in [0, {limit}], got "
                                f"{body.top_logprobs}", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


async def create_chat_completion(body: ChatCompletionRequest, raw: Request,
                                 state: ServerState) -> Response:
    check_model(state, body.model)
    engine = state.engine
    n = 1 if body.n is None else body.n
    admit(state, 1, n)
    if body.chat_template is not None and not state.config.trust_request_chat_template:
        raise APIError(400, "chat_template in a request needs --trust-request-chat-template",
                       param="chat_template")
    text, ids = await engine.run_blocking(  # tools: only with tool_choice "none" (protocol.py)
        render_chat, state, body.messages, body.add_generation_prompt is not False,
        bool(body.add_special_tokens), body.chat_template, body.chat_template_kwargs,
        body.tools)
    defaults = engine.inputs.sampling_defaults
    if body.max_completion_tokens is not None:
        asked, tokens_param = body.max_completion_tokens, "max_completion_tokens"
    else:
        asked, tokens_param = body.max_tokens, "max_tokens"
        if asked is None and "max_tokens" in defaults:
            asked = defaults["max_tokens"]
    max_tokens = resolve_max_tokens(len(ids), asked, engine.max_model_len, "messages",
                                    tokens_param)
    try:
        params = body.to_sampling_params(max_tokens, defaults,
                                         logprobs=_num_logprobs(state, body))
    except ValueError as e:  # SamplingParams names max_tokens for either budget field
        if tokens_param != "max_tokens" and str(e).startswith("max_tokens"):
            raise APIError(400, tokens_param + str(e)[len("max_tokens"):],
                           param=tokens_param) from e
        raise
    prompt = {"prompt": text, "prompt_token_ids": ids}
    engine.prepare(prompt, params)
    rid = new_id("chatcmpl")
    if ignored := body.ignored_fields():
        logger.warning("request %s: unknown fields ignored: %s", rid, ignored)
    log_request(state, rid, [len(ids)], params, body.user)
    merged = merge([engine.generate(rid, prompt, params, time.time())])
    if body.stream:
        first = await cancel_on_disconnect(raw, first_output(merged))
        writer = _ChatStreamWriter(state, body, rid, n)
        return StreamingResponse(sse_stream(writer, first, merged),
                                 media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(writer.abort_unfinished))

    async def last() -> RequestOutput:  # the deltas merged into the final output
        total = None
        async for _, out in merged:
            total = out if total is None else total.merge(out)
            if out.finished:
                return total
        raise EngineError("the request ended without a final output")

    out = await cancel_on_disconnect(raw, last())
    failed = [c.index for c in out.outputs if c.finish_reason == "error"]
    if failed:
        raise APIError(500, f"the engine failed while generating choice(s) {failed}; see the "
                            f"server log", code="engine_error")
    echoed, ids = body.echoed, bool(body.return_token_ids)
    choices = [ChatChoice(index=c.index, message=AssistantMessage(content=echoed + c.text),
                          logprobs=_logprobs(state, body, c, 0),
                          finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                          token_ids=list(c.token_ids) if ids else None)
               for c in out.outputs]
    usage = make_usage(len(out.prompt_token_ids), sum(len(c.token_ids) for c in out.outputs),
                       out.num_cached_tokens)
    resp = ChatCompletionResponse(id=rid, model=state.model_name, choices=choices, usage=usage,
                                  prompt_token_ids=list(out.prompt_token_ids) if ids else None)
    return JSONResponse(resp.model_dump())


def _logprobs(state: ServerState, body: ChatCompletionRequest, c: CompletionOutput,
              start: int) -> ChatLogprobs | None:
    """Chat-format logprobs of c's tokens from `start` on (None when not asked)."""
    if not body.logprobs:
        return None
    entries = (c.logprobs or [])[start:]
    return ChatLogprobs(content=chat_logprobs(state.engine.tokenizer, c.token_ids[start:],
                                              entries, body.top_logprobs or 0,
                                              bool(body.return_tokens_as_token_ids)))


class _ChatStreamWriter(StreamWriter):
    def __init__(self, state: ServerState, body: ChatCompletionRequest, rid: str,
                 n: int) -> None:
        super().__init__(state, rid, n, "chat.completion.chunk", body.continuous_usage,
                         bool(body.return_token_ids))
        self.body, self.n = body, n
        self.final: RequestOutput | None = None
        self.generated = 0  # tokens generated over all choices

    def finish_chunk(self, index: int, reason: str) -> str:
        return self.chunk(_plain(index, {}, reason))

    async def events(self, first: tuple[int, RequestOutput],
                     rest: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        echoed = self.body.echoed  # echo: the last (assistant) message, before the new text
        # return_token_ids: the prompt's ids with each choice's first chunk (vLLM's)
        top = ({"prompt_token_ids": list(first[1].prompt_token_ids)}
               if self.body.return_token_ids else None)
        for i in range(self.n):  # the role first (its usage: the prompt, nothing generated)
            self.took(i, len(first[1].prompt_token_ids), [])
            yield self.chunk(self.with_ids(_plain(i, {"role": "assistant", "content": ""},
                                                  None), i), top)
            if echoed:
                yield self.chunk(_plain(i, {"content": echoed}, None))
        for chunk in self._on_output(first[1]):
            yield chunk
        async for _, out in rest:
            for chunk in self._on_output(out):
                yield chunk
        if self.body.include_usage and self.final is not None:
            f = self.final
            usage = make_usage(len(f.prompt_token_ids), self.generated, f.num_cached_tokens)
            yield sse(ChatCompletionChunk(id=self.rid, created=self.created,
                                          model=self.state.model_name, choices=[],
                                          usage=usage))

    def _on_output(self, out: RequestOutput) -> list[str]:
        self.generated += sum(len(c.token_ids) for c in out.outputs)
        for c in out.outputs:
            self.took(c.index, len(out.prompt_token_ids), c.token_ids)
        if out.finished:
            self.final = out
        return [self.chunk(ch) for c in out.outputs if (ch := self._delta(c))]

    def _delta(self, c: CompletionOutput) -> ChatStreamChoice | dict | None:
        if c.index in self.ended:
            return None
        text = c.text  # a delta: only what is new
        logprobs = _logprobs(self.state, self.body, c, 0)
        if logprobs is not None and not logprobs.content:
            logprobs = None
        if not text and logprobs is None and c.finish_reason is None:
            return None
        self.ended_choice(c.index, c.finish_reason)
        delta = {"content": text} if text else {}
        if logprobs is None:  # the common case, without pydantic
            return self.with_ids(_plain(c.index, delta, c.finish_reason, c.stop_reason),
                                 c.index)
        return self.with_ids(ChatStreamChoice(index=c.index, delta=delta, logprobs=logprobs,
                                              finish_reason=c.finish_reason,
                                              stop_reason=c.stop_reason), c.index)

    def abort_unfinished(self) -> None:
        if self.final is None:
            self.state.engine.abort(self.rid)


def _plain(index: int, delta: dict, finish_reason: str | None,
           stop_reason: int | str | None = None) -> dict:
    """A ChatStreamChoice without logprobs, as the dict its JSON is made of."""
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason,
            "stop_reason": stop_reason}
