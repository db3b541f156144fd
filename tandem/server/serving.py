"""What the two generation endpoints share: the server's state, admission (context budget,
per-request and queue caps), the logprob formats, the SSE stream (one choice per chunk,
ending in `[DONE]` whatever happens), merging several prompts' streams, and cancelling
work when the client goes away.

A stream always ends well-formed: a choice that failed in the engine sends finish_reason
"error" and the stream an error event; when the engine stops (shutdown) every unfinished
choice sends finish_reason "abort", then an error event; `data: [DONE]` comes last.

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
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from tandem.engine.async_engine import AsyncEngine, EngineError, EngineStopped
from tandem.engine.input_processor import ContextLengthError
from tandem.engine.input_processor import resolve_max_tokens as _resolve_max_tokens
from tandem.engine.tokenizer import Tokenizer
from tandem.outputs import Logprob, RequestOutput, TokenLogprobs
from tandem.server.config import ServerConfig
from tandem.server.errors import APIError, error_body
from tandem.server.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob

T = TypeVar("T")
logger = logging.getLogger("tandem.server")

SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ENGINE_FAILED = "the engine failed while generating this choice; see the server log"


@dataclass(frozen=True, slots=True)
class ServerState:
    engine: AsyncEngine
    model_name: str  # the name responses carry (--served-model-name's first)
    model_dir: str
    config: ServerConfig
    aliases: tuple[str, ...] = ()  # other names requests may pass (--served-model-name's rest)

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name,) + self.aliases

    @property
    def max_seqs_per_request(self) -> int:
        """Default 16 x max_num_seqs, the waiting queue's default: a request with more
        sequences than run at once is scheduled in waves, as vLLM does."""
        return (self.config.max_seqs_per_request
                or 16 * self.engine.config.scheduler.max_num_seqs)

    @property
    def max_waiting_requests(self) -> int:
        """0: no limit."""
        limit = self.config.max_waiting_requests
        return 16 * self.engine.config.scheduler.max_num_seqs if limit is None else limit


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in state.model_names:
        served = ", ".join(f"`{n}`" for n in state.model_names)
        raise APIError(404, f"The model `{model}` does not exist. This server serves "
                            f"{served}.", param="model", code="model_not_found")


def admit(state: ServerState, num_prompts: int, n: int) -> None:
    """The per-request and queue caps, before any tokenizing: a 400 for a request that
    asks for too many sequences, a 503 (+ Retry-After) while the waiting queue is full."""
    num_seqs = num_prompts * n
    limit = state.max_waiting_requests
    cap = min(state.max_seqs_per_request, limit or state.max_seqs_per_request)
    if num_seqs > cap:  # could never be admitted: retrying would not help
        raise APIError(400, f"this request asks for {num_seqs} sequences ({num_prompts} "
                            f"prompt(s) x n={n}); the limit is {cap} (--max-seqs-per-request, "
                            f"--max-waiting-requests)", param="n" if n > 1 else "prompt")
    if limit and state.engine.num_waiting_requests + num_seqs > limit:
        raise APIError(503, f"the server is busy: {state.engine.num_waiting_requests} requests "
                            f"are waiting (limit {limit}); retry later",
                       code="queue_full", headers={"Retry-After": "1"})


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def resolve_max_tokens(num_prompt_tokens: int, max_tokens: int | None, max_model_len: int,
                       prompt_param: str = "prompt", tokens_param: str = "max_tokens") -> int:
    """The completion budget (`engine.resolve_max_tokens`) as an OpenAI-style 400."""
    try:
        return _resolve_max_tokens(num_prompt_tokens, max_tokens, max_model_len, prompt_param,
                                   tokens_param)
    except ContextLengthError as e:
        raise APIError(400, str(e), param=e.param, code="context_length_exceeded") from e


def log_request(state: ServerState, rid: str, num_prompt_tokens: list[int],
                params: object, user: str | None) -> None:
    """--enable-log-requests: one line per request (with OpenAI's `user`, which exists for
    exactly this: telling end users apart in the operator's logs)."""
    if state.config.enable_log_requests:
        logger.info("request %s%s: %d prompt(s), prompt tokens %s, %s", rid,
                    f" (user {user!r})" if user else "", len(num_prompt_tokens),
                    num_prompt_tokens, params)


# ---- logprobs ------------------------------------------------------------------------------
def token_text(tokenizer: Tokenizer, token_id: int, as_id: bool = False) -> str:
    """A token as logprobs show it: its text, or "token_id:N" (return_tokens_as_token_ids)."""
    return f"token_id:{token_id}" if as_id else tokenizer.decode([token_id],
                                                                 skip_special_tokens=False)


def _top(entry: TokenLogprobs, num: int) -> list[tuple[int, Logprob]]:
    """The top `num` (token id, Logprob) of a position, best first."""
    return sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:num]


def _shown(tokenizer: Tokenizer, token_id: int, lp: Logprob, as_id: bool) -> str:
    """token_text, from the text the engine already decoded into the Logprob."""
    if as_id or lp.decoded_token is None:
        return token_text(tokenizer, token_id, as_id)
    return lp.decoded_token


def _logprob_of(entry: TokenLogprobs, token_id: int) -> float | None:
    lp = entry.get(token_id)
    return None if lp is None else lp.logprob


def completion_logprobs(tokenizer: Tokenizer, token_ids: Sequence[int],
                        entries: Sequence[TokenLogprobs | None], num_top: int,
                        offset: int, as_ids: bool = False) -> tuple[CompletionLogprobs, int]:
    """The legacy format for `token_ids` whose text starts at character `offset`; returns
    it and the offset after the last token. A None entry (the first prompt token) has no
    logprob; top_logprobs holds the top-N plus the chosen token, as in vLLM."""
    out = CompletionLogprobs()
    for tid, entry in zip(token_ids, entries):
        text = token_text(tokenizer, tid)
        shown = token_text(tokenizer, tid, as_ids)
        out.tokens.append(shown)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        chosen = _logprob_of(entry, tid)
        out.token_logprobs.append(chosen)
        top = {_shown(tokenizer, t, lp, as_ids): lp.logprob for t, lp in _top(entry, num_top)}
        top.setdefault(shown, float("-inf") if chosen is None else chosen)
        out.top_logprobs.append(top)
    return out, offset


def prompt_logprobs_entries(tokenizer: Tokenizer, token_ids: Sequence[int],
                            entries: Sequence[TokenLogprobs | None], num_top: int
                            ) -> list[dict[str, dict] | None]:
    """vLLM's `prompt_logprobs`: per prompt position None (the first) or {token id:
    {logprob, rank, decoded_token}} for the prompt token and the top-N; `rank` is the
    token's 1-based rank in the whole vocabulary (the runner counts it)."""
    out: list[dict[str, dict] | None] = []
    for tid, entry in zip(token_ids, entries):
        if entry is None:
            out.append(None)
            continue
        keep = [tid] + [t for t, _ in _top(entry, num_top)]
        item = {}
        for t in keep:
            lp = entry.get(t)
            item[str(t)] = {"logprob": float("-inf") if lp is None else lp.logprob,
                            "rank": None if lp is None else lp.rank,
                            "decoded_token": token_text(tokenizer, t) if lp is None
                            else _shown(tokenizer, t, lp, False)}
        out.append(item)
    return out


def chat_logprobs(tokenizer: Tokenizer, token_ids: Sequence[int],
                  entries: Sequence[TokenLogprobs],
                  num_top: int, as_ids: bool = False) -> list[ChatTokenLogprob]:
    out = []
    for tid, entry in zip(token_ids, entries):
        text = token_text(tokenizer, tid, as_ids)
        tops = [TopLogprob(token=(s := _shown(tokenizer, t, lp, as_ids)), logprob=lp.logprob,
                           bytes=list(s.encode()))
                for t, lp in _top(entry, num_top)]
        chosen = _logprob_of(entry, tid)
        out.append(ChatTokenLogprob(token=text,
                                    logprob=float("-inf") if chosen is None else chosen,
                                    bytes=list(text.encode()), top_logprobs=tops))
    return out


# ---- streams -------------------------------------------------------------------------------
def sse(payload: BaseModel | dict, exclude: set[str] | None = None) -> str:
    body = (payload.model_dump_json(exclude=exclude) if isinstance(payload, BaseModel)
            else json.dumps(payload))
    return f"data: {body}\n\n"


def engine_failure(e: Exception) -> APIError:
    """The error a client sees for an engine failure: never Python's exception text."""
    if isinstance(e, EngineStopped):  # our own messages: no Python exception text
        return APIError(503, str(e), code="server_shutting_down")
    return APIError(500, "the engine failed while running this request; see the server log",
                    code="engine_error")


class StreamWriter:
    """One stream's chunks: subclasses turn outputs into chunks of one choice each; this
    keeps which choices have ended and closes the rest when the stream must end early."""

    def __init__(self, state: ServerState, rid: str, num_choices: int,
                 object_name: str, continuous_usage: bool = False,
                 return_token_ids: bool = False) -> None:
        self.state, self.rid = state, rid
        # Per choice, kept by `took`: stream_options.continuous_usage_stats (each chunk
        # carries its choice's usage so far: prompt tokens, tokens generated), and
        # return_token_ids (the generated ids not sent yet: a delta whose text is held back
        # sends no chunk, so its ids ride on the next one; `with_ids`)
        self.continuous_usage = continuous_usage
        self.usage_of: dict[int, tuple[int, int]] = {}  # choice -> (prompt, generated)
        self.return_token_ids = return_token_ids
        self.pending_ids: dict[int, list[int]] = {}
        self.created = int(time.time())
        self.num_choices = num_choices
        self.ended: set[int] = set()  # choices whose finish_reason was sent
        self.failed: list[int] = []  # choices that ended with finish_reason "error"
        # Every chunk is this envelope around one choice, rendered once: at hundreds of
        # streams a step, building a pydantic model per chunk costs the engine its GIL.
        head = json.dumps({"id": rid, "object": object_name, "created": self.created,
                           "model": state.model_name})
        self._head = f"data: {head[:-1]}, \"choices\": ["
        self._tail = "], \"system_fingerprint\": null}\n\n"

    def took(self, index: int, prompt_tokens: int, new_ids: list[int]) -> None:
        """Choice `index` (of a prompt of prompt_tokens) generated new_ids."""
        if self.continuous_usage:
            generated = self.usage_of.get(index, (0, 0))[1] + len(new_ids)
            self.usage_of[index] = (prompt_tokens, generated)
        if self.return_token_ids:
            self.pending_ids.setdefault(index, []).extend(new_ids)

    def with_ids(self, choice: BaseModel | dict, index: int, **fields: Any
                 ) -> BaseModel | dict:
        """return_token_ids: the choice with its generated ids not sent yet (and `fields`);
        otherwise the choice as it is."""
        if not self.return_token_ids:
            return choice
        fields = {"token_ids": self.pending_ids.pop(index, []), **fields}
        if isinstance(choice, dict):
            return {**choice, **fields}
        return choice.model_copy(update=fields)

    def chunk(self, choice: BaseModel | dict, top: dict | None = None) -> str:
        """One SSE event holding one choice (a pydantic model or a plain dict); `top`: more
        fields of the envelope (vLLM's prompt_token_ids). With continuous usage, the
        choice's usage so far too."""
        body = choice.model_dump_json() if isinstance(choice, BaseModel) else json.dumps(choice)
        if self.continuous_usage:
            index = choice.index if isinstance(choice, BaseModel) else choice["index"]
            prompt, generated = self.usage_of.get(index, (0, 0))
            top = {**(top or {}), "usage": {"prompt_tokens": prompt,
                                            "completion_tokens": generated,
                                            "total_tokens": prompt + generated}}
        if top:
            extra = "".join(f", {json.dumps(k)}: {json.dumps(v)}" for k, v in top.items())
            return f"{self._head}{body}{self._tail[:-3]}{extra}}}\n\n"
        return f"{self._head}{body}{self._tail}"

    async def events(self, first: tuple[int, RequestOutput],
                     rest: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        raise NotImplementedError

    def finish_chunk(self, index: int, reason: str) -> str:
        """A chunk that ends choice `index` with `reason` and no new text."""
        raise NotImplementedError

    def ended_choice(self, index: int, reason: str | None) -> None:
        if reason is not None:
            self.ended.add(index)
            if reason == "error":
                self.failed.append(index)

    def close_unfinished(self, reason: str) -> Iterator[str]:
        for index in range(self.num_choices):
            if index not in self.ended:
                self.ended_choice(index, reason)
                yield self.finish_chunk(index, reason)


async def sse_stream(writer: StreamWriter, first: tuple[int, RequestOutput],
                     merged: AsyncGenerator[tuple[int, RequestOutput], None]
                     ) -> AsyncIterator[str]:
    """The writer's chunks, then `[DONE]`, whatever happens: a choice that failed in the
    engine adds an error event; an engine that stops (or fails) ends every open choice
    with "abort" (or "error") and an error event. The merged outputs are closed in any
    case (aborting what did not finish)."""
    failure: APIError | None = None
    try:
        async for chunk in writer.events(first, merged):
            yield chunk
    except (EngineError, EngineStopped) as e:
        failure = engine_failure(e)
        for chunk in writer.close_unfinished("abort" if isinstance(e, EngineStopped)
                                             else "error"):
            yield chunk
    finally:
        await merged.aclose()
    if failure is None and writer.failed:
        failure = APIError(500, f"{ENGINE_FAILED} (choice {writer.failed})",
                           code="engine_error")
    if failure is not None:
        yield sse(error_body(failure.status_code, failure.message, code=failure.code))
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
    """Await `work`, cancelling it if the client disconnects first (then a 499). Engine
    failures become their API errors."""
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
    try:
        return task.result()
    except (EngineError, EngineStopped) as e:
        raise engine_failure(e) from e
