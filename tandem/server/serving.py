"""What the two generation endpoints share: the server's state, a request's context budget,
the logprob formats, Server-Sent Events framing, merging several prompts' streams, and
cancelling work when the client goes away.

Abort on disconnect, three ways (any one frees the request's KV blocks at once):
  1. the handler runs under `cancel_on_disconnect` until its response exists: a client that
     leaves while its request waits for a first token (or a whole non-streamed completion)
     cancels the handler, which closes the `AsyncEngine.generate` generators -> abort;
  2. while streaming, Starlette cancels the body iterator on disconnect: same path;
  3. the streaming response's background task aborts every request id it did not see
     finish (idempotent), in case the body iterator was never started or closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel

from tandem.engine.async_engine import AsyncEngine, EngineError, EngineStopped
from tandem.engine.tokenizer import Tokenizer
from tandem.outputs import Logprobs, RequestOutput
from tandem.server.errors import APIError, error_body
from tandem.server.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True, slots=True)
class ServerState:
    engine: AsyncEngine
    model_name: str  # the name clients pass as `model` (--served-model-name)
    model_dir: str
    api_key: str | None  # None: no authentication


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise APIError(404, f"The model `{model}` does not exist. This server serves "
                            f"`{state.model_name}`.", param="model", code="model_not_found")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                       prompt_param: str = "prompt") -> int:
    """The completion budget; a 400 naming both lengths when it cannot fit the context."""
    if max_tokens is None:  # as much as the context leaves
        if num_prompt_tokens >= max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} "
                                f"tokens. However, your prompt has {num_prompt_tokens} tokens, "
                                f"leaving no room for the completion. Please shorten the "
                                f"{prompt_param}.",
                           param=prompt_param, code="context_length_exceeded")
        return max_model_len - num_prompt_tokens
    if max_tokens >= 1 and num_prompt_tokens + max_tokens > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. "
                            f"However, you requested {num_prompt_tokens + max_tokens} tokens "
                            f"({num_prompt_tokens} in the {prompt_param}, {max_tokens} for the "
                            f"completion). Please reduce the length of the {prompt_param} or "
                            f"max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


# ---- logprobs ------------------------------------------------------------------------------
def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _top(entry: Logprobs, num: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:num]


def completion_logprobs(tokenizer: Tokenizer, token_ids: Sequence[int],
                        entries: Sequence[Logprobs | None], num_top: int,
                        offset: int) -> tuple[CompletionLogprobs, int]:
    """The legacy format for `token_ids` whose text starts at character `offset`; returns
    it and the offset after the last token. A None entry (the first prompt token) has no
    logprob; top_logprobs holds the top-N plus the chosen token, as in vLLM."""
    out = CompletionLogprobs()
    for tid, entry in zip(token_ids, entries):
        text = token_text(tokenizer, tid)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(entry.get(tid))
        top = {token_text(tokenizer, t): lp for t, lp in _top(entry, num_top)}
        top.setdefault(text, entry.get(tid, float("-inf")))
        out.top_logprobs.append(top)
    return out, offset


def chat_logprobs(tokenizer: Tokenizer, token_ids: Sequence[int],
                  entries: Sequence[Logprobs], num_top: int) -> list[ChatTokenLogprob]:
    out = []
    for tid, entry in zip(token_ids, entries):
        text = token_text(tokenizer, tid)
        tops = [TopLogprob(token=(s := token_text(tokenizer, t)), logprob=lp,
                           bytes=list(s.encode()))
                for t, lp in _top(entry, num_top)]
        out.append(ChatTokenLogprob(token=text, logprob=entry.get(tid, float("-inf")),
                                    bytes=list(text.encode()), top_logprobs=tops))
    return out


# ---- streams -------------------------------------------------------------------------------
def sse(payload: BaseModel | dict, exclude: set[str] | None = None) -> str:
    body = (payload.model_dump_json(exclude=exclude) if isinstance(payload, BaseModel)
            else json.dumps(payload))
    return f"data: {body}\n\n"


def engine_failure(e: Exception) -> APIError:
    if isinstance(e, EngineStopped):
        return APIError(503, str(e), code="server_shutting_down")
    return APIError(500, str(e), code="engine_error")


async def sse_stream(chunks: AsyncGenerator[str, None],
                     rest: AsyncGenerator[tuple[int, RequestOutput], None]
                     ) -> AsyncIterator[str]:
    """An endpoint's SSE chunks, then `[DONE]`. An engine failure mid-stream becomes an
    error event; the engine's remaining outputs are closed in any case (aborting what
    did not finish)."""
    try:
        async for chunk in chunks:
            yield chunk
    except (EngineError, EngineStopped) as e:
        err = engine_failure(e)
        yield sse(error_body(err.status_code, err.message, code=err.code))
    finally:
        await chunks.aclose()
        await rest.aclose()
    yield SSE_DONE


async def merge(gens: list[AsyncGenerator[RequestOutput, None]]
                ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """(prompt index, output) from several generators as they come. Closing or cancelling
    the merge closes every generator, which aborts their requests."""
    if len(gens) == 1:
        try:
            async for out in gens[0]:
                yield 0, out
        finally:
            await gens[0].aclose()
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, gen: AsyncGenerator[RequestOutput, None]) -> None:
        try:
            async for out in gen:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            with contextlib.suppress(Exception):
                await g.aclose()


async def first_output(merged: AsyncIterator[tuple[int, RequestOutput]]
                       ) -> tuple[int, RequestOutput]:
    """The first (prompt index, output): a stream's 200 goes out only once the request was
    accepted and has a token, so validation and engine errors can still be a 4xx/5xx."""
    return await anext(merged)


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first (then a 499)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.cancelled():
        raise APIError(499, "client disconnected")
    return task.result()
