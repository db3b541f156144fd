"""`AsyncEngine`: an `Engine` behind an asyncio front end.

    event loop (request handlers)             the engine side (EngineLoop, engine_loop.py)
    add_request: tokenize + validate --Add-->   Engine.add_request          (between steps)
    abort(request_id)               --Abort-->  Engine.abort_request: KV blocks freed
    RequestStream.__anext__   <--events--  Engine.step() -> RequestOutputs (deltas, for the server)

The engine side runs in one of two places:
  - a thread of this process (`AsyncEngine(engine)`): tests and simple embeddings;
  - its own process (`AsyncEngine.in_process(config)`, engine/core_process.py), which
    `tandem serve` uses: HTTP, SSE and tokenization then never take the GIL the engine's
    step loop needs (vLLM v1's layout).
Either way handlers never touch the engine: commands queue on a list that the engine side
drains between steps. Validation (tokenize, `InputProcessor.validate`, `SamplingParams`)
runs in the caller, so bad input raises ValueError before anything is queued; the rare late
rejection (a duplicate id) surfaces from the stream instead. Tokenizing, detokenizing and
chat-template rendering of request payloads run on a small thread pool (`run_blocking`),
never on the event loop: the tokenizer releases the GIL.

A step that raises is isolated by `Engine.step` (only the request that causes it ends,
with finish_reason "error"). Should the step machinery itself fail, every live request
fails with `EngineError` and is aborted, and the engine keeps serving new requests. If the
engine cannot go on (its process died, or a tensor-parallel worker did), every live
request fails with `EngineError`, /health turns 503 and `on_dead` is called (the server
then exits non-zero).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tandem.engine.engine import Engine
from tandem.engine.gc_heap import frozen_heap
from tandem.engine.engine_loop import (Abort, Add, Command, EngineError, EngineLoop,
                                       EngineStopped, Event, Exit, KVFailed, KVReady)
from tandem.engine.input_processor import InputProcessor, PromptType
from tandem.engine.stats import EngineStats
from tandem.outputs import RequestOutput
from tandem.request import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")
__all__ = ["AsyncEngine", "EngineError", "EngineStopped", "RequestStream", "StepHook"]

# Called after every engine iteration (step, adds, aborts) with its outputs and a fresh stats
# snapshot, on the thread that receives them: metrics and periodic logs hang here.
StepHook = Callable[[list[RequestOutput], EngineStats], None]


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


class AsyncEngine:
    def __init__(self, engine: Engine | None, on_step: StepHook | None = None,
                 core: Any = None) -> None:
        """In-process: pass the engine. With `core` (a ProcessCore), the engine lives in
        another process and `engine` is None; use `AsyncEngine.in_process`."""
        self.engine = engine
        self._core = core
        self.inputs: InputProcessor = engine.inputs if engine is not None else core.inputs
        self.tokenizer = self.inputs.tokenizer
        self.max_model_len = self.inputs.max_model_len
        self.vocab_size = self.inputs.vocab_size
        self.config = self.inputs.config
        self.on_step = on_step
        self.on_dead: Callable[[BaseException], None] | None = None  # the engine is gone
        # A disaggregation worker's control messages (disagg/worker.py), from its rx thread
        self.on_control: Callable[[list], None] | None = None
        self._cond = threading.Condition()
        self._commands: list[Command] = []  # guarded by _cond
        self._stopping = False  # guarded by _cond; no new requests once set
        self._exit = False  # guarded by _cond; the engine side aborts what is left and stops
        # Live requests' streams: set by the event loop before their Add is queued, removed
        # by whichever thread delivers their last event (dict operations are atomic).
        self._streams: dict[str, RequestStream] = {}
        self._num_waiting = 0  # the scheduler's waiting queue after the last iteration
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tandem-tokenize")

    @classmethod
    def in_process(cls, config: Any, on_step: StepHook | None = None,
                   log_level: int = logging.INFO, role: Any = None) -> AsyncEngine:
        """The engine in its own process (started here; ValueError if it cannot start).
        role: a disagg.worker.WorkerRole for a disaggregation worker."""
        from tandem.engine.core_process import ProcessCore
        return cls(None, on_step, core=ProcessCore(config, log_level, role))

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine side (idempotent)."""
        if self._thread is not None:
            return
        if self._core is None:
            self._thread = threading.Thread(target=self._run_local, name="tandem-engine",
                                            daemon=True)
        else:
            self._thread = threading.Thread(target=self._send_remote, name="tandem-engine-tx",
                                            daemon=True)
            self._core.start(self._on_events, self._died, self.on_control)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        if self._core is not None:
            alive = alive and self._core.alive
        return alive and not self._stopping

    def describe(self) -> dict[str, Any]:
        """What the engine is (for the start-up log line)."""
        if self._core is not None:
            return self._core.info
        return self.engine.describe()

    @property
    def num_live_requests(self) -> int:
        """Requests queued or running (read from any thread; a snapshot)."""
        return len(self._streams)

    @property
    def num_waiting_requests(self) -> int:
        """Scheduler requests (n per user request) waiting for a first step, including those
        not yet handed to the engine (a snapshot, for admission control)."""
        return self._num_waiting + sum(c.params.n for c in list(self._commands)
                                       if isinstance(c, Add))

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Refuse new requests, let live ones finish for up to `timeout` seconds, then abort
        the rest (their streams raise EngineStopped) and stop the engine. Idempotent."""
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
        if self._core is not None:
            await asyncio.to_thread(self._core.join, 30.0)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run_blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run tokenizer work (`fn(*args, **kwargs)`) on the pool, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    # ---- requests (event loop) -----------------------------------------------------------
    def prepare(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Tokenize and validate a prompt; raises ValueError. Text is tokenized in the
        calling thread: the server tokenizes on the pool first (`run_blocking`) and passes
        token ids."""
        text, token_ids = self.inputs.tokenize_prompt(prompt)
        self.inputs.validate(token_ids, params)
        return text, token_ids

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None, disagg: Any = None) -> RequestStream:
        """Validate (ValueError: nothing is queued), then hand the request to the engine.
        Call from the event loop that will consume the stream. disagg: engine_loop.Add's."""
        if not self.is_running:
            raise EngineStopped("the engine is not running (the server is shutting down, or "
                                "the engine process died)")
        text, token_ids = self.prepare(prompt, params)
        stream = RequestStream(request_id, asyncio.get_running_loop())
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        self._streams[request_id] = stream
        self._submit(Add(request_id, {"prompt": text, "prompt_token_ids": token_ids}, params,
                         arrival_time if arrival_time is not None else time.time(), disagg))
        return stream

    async def generate(self, request_id: str, prompt: PromptType, params: SamplingParams,
                       arrival_time: float | None = None, disagg: Any = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs until it finishes. Bad input raises ValueError at the
        first `anext`, before anything is queued. If the consumer stops early (the generator
        is closed or its task cancelled), the request is aborted at once."""
        stream = self.add_request(request_id, prompt, params, arrival_time, disagg)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request (any thread); its KV blocks are freed before the next step.
        Unknown or finished ids are ignored."""
        self._submit(Abort(request_id))

    def kv_failed(self, request_id: str) -> None:
        """Disaggregation: the request's KV will not come; the decode worker prefills it."""
        self._submit(KVFailed(request_id))

    def kv_ready(self, request_id: str, blob: bytes, via: str) -> None:
        """Disaggregation: the request's KV, or its header, as a message (engine_loop.KVReady)."""
        self._submit(KVReady(request_id, blob, via))

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(serving, the /health body)."""
        return self.is_running, {"status": "ok" if self.is_running else "stopping"}

    def _submit(self, command: Command) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _take_commands(self, block: bool) -> list[Command]:
        with self._cond:
            while block and not self._commands and not self._exit:
                self._cond.wait()
            commands, self._commands = self._commands, []
            if self._exit:
                commands.append(Exit())
                self._exit = False
            if self._stopping:  # adds that raced the shutdown fail instead of starting
                for c in [c for c in commands if isinstance(c, Add)]:
                    commands.remove(c)
                    self._on_events([(c.request_id, EngineStopped("the server is shutting "
                                                                  "down"))], [], None, None)
            return commands

    # ---- the engine side, in this process ---------------------------------------------------
    def _run_local(self) -> None:
        loop = EngineLoop(self.engine, self._on_events)
        with frozen_heap():
            while loop.run_once(self._take_commands(block=not loop.has_work())):
                pass
        self.engine.shutdown()
        if loop.dead is not None:
            self._died(loop.dead)

    # ---- the engine side, in its own process ------------------------------------------------
    def _send_remote(self) -> None:
        """Forward commands to the engine process until an Exit has gone."""
        while True:
            commands = self._take_commands(block=True)
            if not self._core.send(commands) or any(isinstance(c, Exit) for c in commands):
                return

    # ---- results, from either side ----------------------------------------------------------
    def _on_events(self, events: list[Event], outputs: list[RequestOutput],
                   stats: EngineStats | None, num_waiting: int | None) -> None:
        """Hand each event to its stream (one wake-up per event loop) and run the hook."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, item in events:
            final = isinstance(item, BaseException) or item.finished
            stream = self._streams.pop(rid, None) if final else self._streams.get(rid)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        if num_waiting is not None:
            self._num_waiting = num_waiting
        if self.on_step is not None and stats is not None:
            try:
                self.on_step(outputs, stats)
            except Exception:
                logger.exception("step hook failed")

    def fail_all(self, error: BaseException) -> None:
        """Fail every live stream (the engine process died)."""
        self._on_events([(rid, error) for rid in list(self._streams)], [], None, None)

    def _died(self, error: BaseException) -> None:
        self.fail_all(error if isinstance(error, EngineError) else EngineError(str(error)))
        if self.on_dead is not None:
            self.on_dead(error)


def _put_all(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream.put(item)
