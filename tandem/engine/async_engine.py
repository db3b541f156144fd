"""`AsyncEngine`: the in-process `Engine` behind an asyncio front end, stepped by one thread.

    event loop (request handlers)                 engine thread (the only one touching Engine)
    add_request: tokenize + validate   --cmd-->   Engine.add_request         (between steps)
    abort(request_id)                  --cmd-->   Engine.abort_request: KV blocks freed
    RequestStream.__anext__   <--call_soon_threadsafe--   Engine.step() -> RequestOutputs

The engine is not thread-safe, so handlers never call it: they append commands to a list
that the engine thread drains between steps. The thread steps while the engine has work
and sleeps on a condition variable otherwise. Validation (tokenize, `Engine.validate`,
`SamplingParams`) runs in the caller, so bad input raises ValueError before anything is
queued; the rare late rejection (a duplicate id) surfaces from the stream instead.
Tokenizing, detokenizing and chat-template rendering of request payloads run on a small
thread pool (`run_blocking`), never on the event loop: the tokenizer releases the GIL, so
a long prompt delays neither other requests nor the engine thread.

A step that raises is isolated by `Engine.step` (only the request that causes it ends,
with finish_reason "error"). Should the step machinery itself fail, every live request
fails with `EngineError` and is aborted, and the thread keeps serving new requests.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from tandem.engine.engine import Engine, PromptType
from tandem.engine.stats import EngineStats
from tandem.outputs import RequestOutput
from tandem.request import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Called on the engine thread after every step (and after aborts), with the step's outputs
# and a fresh stats snapshot: metrics and periodic logs hang here.
StepHook = Callable[[list[RequestOutput], EngineStats], None]


class EngineError(RuntimeError):
    """The engine failed while running this request (a step raised); it was aborted."""


class EngineStopped(RuntimeError):
    """The engine shut down before this request finished; it was aborted."""


class RequestStream:
    """One request's outputs, consumed in the event loop that created it.

    When several are queued, `__anext__` hands them out as one: the newest if outputs are
    cumulative, the merge if they are deltas. Iteration ends after the finished output, or
    raises the error the engine reported."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.finished = False  # set once the final output (or an error) was taken
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        """Event-loop side of a delivery (scheduled by the engine thread)."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            newer = self._queue.get_nowait()
            item = item.merge(newer) if item.delta and isinstance(newer, RequestOutput) \
                else newer
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item


@dataclass(frozen=True, slots=True)
class _Add:
    request_id: str
    prompt: dict  # {"prompt": text | None, "prompt_token_ids": [...]}, already validated
    params: SamplingParams
    arrival_time: float
    stream: RequestStream


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: Engine, on_step: StepHook | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.on_step = on_step
        self._cond = threading.Condition()
        self._commands: list[_Add | _Abort] = []  # guarded by _cond
        self._stopping = False  # guarded by _cond; no new requests once set
        self._exit = False  # guarded by _cond; the thread aborts what is left and returns
        self._streams: dict[str, RequestStream] = {}  # live requests; engine thread only
        self._num_waiting = 0  # the scheduler's waiting queue after the last step
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tandem-tokenize")

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tandem-engine", daemon=True)
            self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_live_requests(self) -> int:
        """Requests queued or running (read from any thread; a snapshot)."""
        return len(self._streams) + sum(isinstance(c, _Add) for c in list(self._commands))

    @property
    def num_waiting_requests(self) -> int:
        """Scheduler requests (n per user request) waiting for a first step, including those
        not yet handed to the engine thread (a snapshot, for admission control)."""
        return self._num_waiting + sum(c.params.n for c in list(self._commands)
                                       if isinstance(c, _Add))

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Refuse new requests, let live ones finish for up to `timeout` seconds, then abort
        the rest (their streams raise EngineStopped) and stop the thread. Idempotent."""
        with self._cond:
            self._stopping = True
        deadline = time.monotonic() + timeout
        while self.num_live_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._cond:
            self._exit = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run_blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run tokenizer work (`fn(*args, **kwargs)`) on the pool, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    # ---- requests (event loop) -----------------------------------------------------------
    def prepare(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Tokenize and validate a prompt; raises ValueError. Safe while the engine steps:
        it reads only the tokenizer and immutable limits. Text is tokenized in the calling
        thread: the server tokenizes on the pool first (`run_blocking`) and passes ids."""
        text, token_ids = self.engine.tokenize_prompt(prompt)
        self.engine.validate(token_ids, params)
        return text, token_ids

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None) -> RequestStream:
        """Validate (ValueError: nothing is queued), then hand the request to the engine
        thread. Call from the event loop that will consume the stream."""
        if not self.is_running:
            raise EngineStopped("the engine is not running (shutting down?)")
        text, token_ids = self.prepare(prompt, params)
        stream = RequestStream(request_id, asyncio.get_running_loop())
        self._submit(_Add(request_id, {"prompt": text, "prompt_token_ids": token_ids}, params,
                          arrival_time if arrival_time is not None else time.time(), stream))
        return stream

    async def generate(self, request_id: str, prompt: PromptType, params: SamplingParams,
                       arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes. Bad input raises ValueError at the
        first `anext`, before anything is queued. If the consumer stops early (the generator
        is closed or its task cancelled), the request is aborted at once."""
        stream = self.add_request(request_id, prompt, params, arrival_time)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (any thread); its KV blocks are freed before the next step.
        Unknown or finished ids are ignored."""
        self._submit(_Abort(request_id))

    def _submit(self, command: _Add | _Abort) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    # ---- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while (not self._commands and not self._exit
                       and not engine.has_unfinished_requests()):
                    self._cond.wait()
                commands, self._commands = self._commands, []
                exiting = self._exit
            deliveries: list[tuple[RequestStream, RequestOutput | BaseException]] = []
            outputs: list[RequestOutput] = []
            for command in commands:
                self._apply(command, deliveries, outputs)
            if exiting:
                self._fail_all(EngineStopped("the server shut down before the request "
                                             "finished"), deliveries, outputs)
                self._deliver(deliveries)
                self._notify(outputs)
                return
            if engine.has_unfinished_requests():
                outputs += self._step(deliveries, outputs)
            self._num_waiting = engine.scheduler.num_waiting
            self._deliver(deliveries)
            self._notify(outputs)

    def _step(self, deliveries: list, aborted: list) -> list[RequestOutput]:
        try:
            step_outputs = self.engine.step()
        except Exception as e:  # keep serving: fail what was live, carry on
            logger.exception("engine step failed; aborting %d live request(s)",
                             len(self._streams))
            self._fail_all(EngineError(f"engine step failed: {e!r}"), deliveries, aborted)
            return []
        for out in step_outputs:
            stream = (self._streams.pop(out.request_id, None) if out.finished
                      else self._streams.get(out.request_id))
            if stream is not None:
                deliveries.append((stream, out))
        return step_outputs

    def _apply(self, command: _Add | _Abort, deliveries: list, outputs: list) -> None:
        if isinstance(command, _Abort):
            stream = self._streams.pop(command.request_id, None)
            try:
                out = self.engine.abort_request(command.request_id)
            except Exception:
                logger.exception("abort of %s failed", command.request_id)
                return
            if out is not None:
                outputs.append(out)
                if stream is not None:
                    deliveries.append((stream, out))
            return
        if self._stopping:
            deliveries.append((command.stream, EngineStopped("the server is shutting down")))
            return
        try:
            if command.request_id in self._streams:
                raise ValueError(f"request_id {command.request_id!r} is already in use")
            self.engine.add_request(command.request_id, command.prompt, command.params,
                                    command.arrival_time)
        except Exception as e:  # ValueError (late validation) or an engine failure
            deliveries.append((command.stream, e))
            return
        self._streams[command.request_id] = command.stream

    def _fail_all(self, error: BaseException, deliveries: list, outputs: list) -> None:
        for request_id, stream in list(self._streams.items()):
            try:
                out = self.engine.abort_request(request_id)
                if out is not None:
                    outputs.append(out)
            except Exception:
                logger.exception("abort of %s failed", request_id)
            deliveries.append((stream, error))
        self._streams.clear()

    @staticmethod
    def _deliver(deliveries: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
        """One wake-up per event loop per step, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, item in deliveries:
            by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _notify(self, outputs: list[RequestOutput]) -> None:
        if self.on_step is None:
            return
        try:
            self.on_step(outputs, self.engine.stats())
        except Exception:
            logger.exception("step hook failed")


def _put_all(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream.put(item)
