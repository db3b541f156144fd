"""`EngineLoop`: the engine's side of serving, whatever carries its messages.

Each `run_once(commands)` applies the commands that arrived (add, abort, exit) between
steps, runs one `Engine.step` if there is work, and hands what happened to `emit`:

    emit(events, outputs, stats, num_waiting)
        events   [(request_id, RequestOutput | exception)]: what each consumer gets
        outputs  every RequestOutput of the iteration (metrics hooks read them)

It runs on a thread of the server process (AsyncEngine, in-process mode) or as the main
loop of a separate engine process (core_process.py); the messages are plain dataclasses,
so they pickle across the boundary. A step that raises past `Engine.step`'s own isolation
fails the live requests with `EngineError`; the loop carries on. If the executor is dead
(a tensor-parallel worker died), the live requests fail, `dead` holds the reason and
`run_once` returns False: the engine cannot serve any more.

A disaggregation worker passes its role's `side` (disagg/worker.py): it adds the requests
that carry an `Add.disagg`, takes `KVFailed` and `KVReady`, and sees each step's outputs first (a prefill
worker ships the KV of the prompts it finished before anything can evict it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tandem.engine.engine import Engine
from tandem.engine.stats import EngineStats
from tandem.executor import ExecutorDead
from tandem.outputs import RequestOutput
from tandem.request import SamplingParams

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The engine failed while running this request (a step raised); it was aborted."""


class EngineStopped(RuntimeError):
    """The engine shut down before this request finished; it was aborted."""


@dataclass(frozen=True, slots=True)
class Add:
    request_id: str
    prompt: dict  # {"prompt": text | None, "prompt_token_ids": [...]}, already validated
    params: SamplingParams
    arrival_time: float
    # Disaggregation (disagg/worker.py): a RouteHint for a decode worker (apply the rule),
    # a ShipTo for a prefill worker (send the prompt's KV after its prefill); None otherwise.
    disagg: Any = None


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class KVFailed:
    """Disaggregation: the prefill or the transfer of this request's KV failed; the decode
    worker prefills it itself."""
    request_id: str


@dataclass(frozen=True, slots=True)
class Exit:
    """Abort whatever is live (EngineStopped) and stop."""


@dataclass(frozen=True, slots=True)
class KVReady:
    """Disaggregation: this request's KV as a message: the payload (via "ipc":
    disagg/connector.pack), or the header of a point-to-point send (via "nccl": disagg/p2p.py)."""
    request_id: str
    blob: bytes
    via: str = "ipc"


Command = Add | Abort | KVFailed | KVReady | Exit
Event = tuple[str, RequestOutput | BaseException]
Emit = Callable[[list[Event], list[RequestOutput], EngineStats, int], None]


class EngineLoop:
    def __init__(self, engine: Engine, emit: Emit, side: Any = None) -> None:
        self.engine = engine
        self.emit = emit
        self.side = side  # a disagg.worker.PrefillSide or DecodeSide, or None
        self.live: set[str] = set()  # request ids added and not yet finished
        self.dead: ExecutorDead | None = None  # why the engine cannot go on, once it cannot

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def run_once(self, commands: list[Command]) -> bool:
        """Apply `commands`, step once if there is work, emit. False after an Exit."""
        events: list[Event] = []
        outputs: list[RequestOutput] = []
        exiting = False
        for command in commands:
            if isinstance(command, Exit):
                exiting = True
            else:
                self._apply(command, events, outputs)
        if exiting:
            self._fail_all(EngineStopped("the server shut down before the request finished"),
                           events, outputs)
        elif self.engine.has_unfinished_requests():
            self._step(events, outputs)
        if commands or outputs or events:
            self.emit(events, outputs, self.engine.stats(), self.engine.scheduler.num_waiting)
        return not exiting and self.dead is None

    def _step(self, events: list[Event], outputs: list[RequestOutput]) -> None:
        try:
            step_outputs = self.engine.step()
        except ExecutorDead as e:  # nothing can run any more: fail what was live, stop
            logger.critical("the engine cannot go on: %s", e)
            self.dead = e
            self._fail_all(EngineError(f"the engine stopped: {e}"), events, outputs)
            return
        except Exception as e:  # keep serving: fail what was live, carry on
            logger.exception("engine step failed; aborting %d live request(s)", len(self.live))
            self._fail_all(EngineError(f"engine step failed: {e!r}"), events, outputs)
            return
        if self.side is not None:
            self.side.after_step(self.engine, step_outputs)
        for out in step_outputs:
            if out.request_id in self.live:
                if out.finished:
                    self.live.discard(out.request_id)
                events.append((out.request_id, out))
        outputs += step_outputs

    def _apply(self, command: Add | Abort | KVFailed | KVReady, events: list[Event],
               outputs: list[RequestOutput]) -> None:
        rid = command.request_id
        if isinstance(command, KVFailed | KVReady):
            if self.side is not None:
                self.side.kv_message(command)
            return
        if isinstance(command, Abort):
            try:
                out = self.engine.abort_request(rid)
            except Exception:
                logger.exception("abort of %s failed", rid)
                return
            if out is not None:
                outputs.append(out)
                if rid in self.live:
                    self.live.discard(rid)
                    events.append((rid, out))
            return
        try:
            if rid in self.live:
                raise ValueError(f"request_id {rid!r} is already in use")
            if command.disagg is not None and self.side is not None:
                self.side.add(self.engine, command)
            else:
                self.engine.add_request(rid, command.prompt, command.params,
                                        command.arrival_time)
        except Exception as e:  # ValueError (late validation) or an engine failure
            events.append((rid, e))
            return
        self.live.add(rid)

    def _fail_all(self, error: BaseException, events: list[Event],
                  outputs: list[RequestOutput]) -> None:
        for rid in sorted(self.live):
            try:
                out = self.engine.abort_request(rid)
                if out is not None:
                    outputs.append(out)
            except Exception:
                logger.exception("abort of %s failed", rid)
            events.append((rid, error))
        self.live.clear()
