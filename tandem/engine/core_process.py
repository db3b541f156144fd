"""The engine in its own process: `ProcessCore` (server side) and `core_main` (engine side).

    server process                                   engine process (spawned)
    AsyncEngine --commands--> [tx thread] ==pipe==> core_main: EngineLoop.run_once
    AsyncEngine._on_events <-- [rx thread] <==pipe== emit(events, outputs, stats, waiting)

Two one-way pipes of pickled messages (the commands and events of engine_loop.py; outputs
travel as plain tuples, without the prompt, which the server side keeps per request). The
engine process builds the `Engine` (model, KV cache, CUDA graphs) and reports "ready" with
what it is, or the error that stopped it, which the server raises as ValueError. Only the
engine process touches the GPU; the server process keeps an `InputProcessor` of its own.
If the engine process dies, the rx thread fails every live request and `alive` turns False;
if the server process dies, the engine process ends too (`end_with_parent`).
A disaggregation worker (given a `disagg.worker.WorkerRole`) also sends ("control", [...])
messages after an iteration: its decisions and transfers, for the front end.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from tandem.config import EngineConfig
from tandem.engine.engine_loop import Add, Command, EngineError, EngineLoop
from tandem.engine.gc_heap import frozen_heap
from tandem.engine.input_processor import InputProcessor
from tandem.outputs import CompletionOutput, RequestMetrics, RequestOutput

logger = logging.getLogger(__name__)
_START_TIMEOUT_S = 1800.0  # model load + KV sizing + CUDA graph capture


def end_with_parent() -> None:
    """End this process as soon as the process that spawned it is gone, whatever it is doing
    then (loading the model, stepping, or waiting at exit on a thread): an engine process
    never outlives its server, nor keeps the server's stdout and stderr open after it. (A
    server that fails to start may exit while a worker's engine process is still loading; a
    caller waiting for the server's output then waited for that orphan too.)"""
    parent = mp.parent_process()
    if parent is None:  # not spawned by multiprocessing
        return

    def watch() -> None:
        parent.join()  # its sentinel closes when it ends
        os._exit(1)

    threading.Thread(target=watch, name="tandem-parent-watch", daemon=True).start()


def core_main(config: EngineConfig, commands: Any, events: Any, log_level: int,
              role: Any = None) -> None:
    """The engine process: build the engine, then apply commands and step until Exit.
    role: a disagg.worker.WorkerRole for a prefill or decode worker, else None."""
    end_with_parent()
    name = "engine" if role is None else f"{role.role}{role.index}"
    logging.basicConfig(level=log_level,
                        format=f"%(asctime)s %(levelname)s %(name)s[{name}]: %(message)s")
    if role is not None:  # before CUDA and torch.distributed initialize
        from tandem import envs
        os.environ.update(envs.NO_NVLINK_MULTICAST)  # workers may join an NCCL group
        if role.cuda_device is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(role.cuda_device)
    from tandem.engine.engine import Engine
    try:
        engine = Engine(config)
        side = None
        if role is not None:
            from tandem.disagg.worker import make_side
            side = make_side(engine, role)
    except Exception as e:  # reported to the server, which exits with the message
        events.send(("error", f"{e}", isinstance(e, ValueError)))
        return
    events.send(("ready", {**engine.describe(), "pid": os.getpid()}))

    sent_prompt_logprobs: set[str] = set()

    def emit(evts: list, outputs: list, stats: Any, num_waiting: int) -> None:
        index = {id(out): i for i, out in enumerate(outputs)}
        packed = [_pack(out, sent_prompt_logprobs) for out in outputs]
        refs = [(rid, index[id(item)]) if id(item) in index else (rid, item)
                for rid, item in evts]
        events.send(("events", refs, packed, stats, num_waiting))

    loop = EngineLoop(engine, emit, side)
    sched = engine.scheduler
    running = True
    try:
        with frozen_heap():
            while running:
                batch: list[Command] = []
                if not loop.has_work():
                    batch += commands.recv()  # idle: wait for work
                elif not sched.running and not sched.waiting:  # only requests awaiting KV
                    commands.poll(0.002)
                while commands.poll():
                    batch += commands.recv()
                running = loop.run_once(batch)
                if side is not None:
                    control = side.take_control()
                    if control:
                        events.send(("control", control))
    finally:
        engine.shutdown()  # the tensor-parallel workers, if any
    if loop.dead is not None:  # the server fails what is left, reports unhealthy, exits
        events.send(("dead", str(loop.dead)))
        sys.exit(1)
    events.send(("exit",))


def _pack(out: RequestOutput, sent_prompt_logprobs: set[str]) -> tuple:
    """An output as plain tuples (pickled in C, unlike slotted dataclasses), without the
    prompt (the server kept it) and with prompt logprobs only the first time."""
    lps = None
    if out.prompt_logprobs is not None and out.request_id not in sent_prompt_logprobs:
        lps = out.prompt_logprobs
        sent_prompt_logprobs.add(out.request_id)
    if out.finished:
        sent_prompt_logprobs.discard(out.request_id)
    m = out.metrics
    return (out.request_id, out.finished, out.delta, out.num_cached_tokens,
            (m.arrival_time, m.first_scheduled_time, m.first_token_time, m.finished_time),
            [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.logprobs,
              c.cumulative_logprob) for c in out.outputs], lps)


class ProcessCore:
    def __init__(self, config: EngineConfig, log_level: int = logging.INFO,
                 role: Any = None) -> None:
        """role: a disagg.worker.WorkerRole (a disaggregation worker), else None."""
        self.inputs = InputProcessor(config)  # validates the model directory early
        self.config = self.inputs.config
        self.log_level = log_level
        self.role = role
        self.info: dict[str, Any] = {}
        self.alive = False
        self._proc: mp.process.BaseProcess | None = None
        self._rx: threading.Thread | None = None
        self._tx_lock = threading.Lock()
        # request id -> (prompt text, prompt token ids) and prompt logprobs, of live requests
        self._prompts: dict[str, tuple[str | None, list[int]]] = {}
        self._prompt_logprobs: dict[str, list] = {}

    def start(self, on_events: Callable[..., None],
              on_dead: Callable[[BaseException], None],
              on_control: Callable[[list], None] | None = None) -> None:
        """Start the engine process (spawn it, or reach it: `_open`) and wait until it is
        ready (ValueError if it fails). on_control: a disaggregation worker's control
        messages (disagg/worker.py)."""
        if self._rx is not None:
            return
        self._open()
        if not self._evt_r.poll(_START_TIMEOUT_S):
            self._stop()
            raise ValueError("the engine process did not start in time")
        try:
            message = self._evt_r.recv()
        except (EOFError, OSError):
            message = ("error", f"the engine process exited ({self._exitcode()})", False)
        if message[0] == "error":
            self._stop()
            raise ValueError(message[1])
        self.info = message[1]
        self.alive = True
        self._rx = threading.Thread(target=self._receive,
                                    args=(on_events, on_dead, on_control),
                                    name="tandem-engine-rx", daemon=True)
        self._rx.start()

    def _open(self) -> None:
        """Spawn the engine process; set the command and event connections."""
        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        cmd_r, self._cmd_w = ctx.Pipe(duplex=False)
        self._evt_r, evt_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=core_main, name="tandem-engine-core", daemon=True,
                                 args=(self.config, cmd_r, evt_w, self.log_level, self.role))
        self._proc.start()
        cmd_r.close()
        evt_w.close()

    def _stop(self) -> None:
        """A start that failed: end the process."""
        if self._proc is not None:
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()

    def _exitcode(self) -> int | None:
        return self._proc.exitcode if self._proc is not None else None

    def send(self, commands: list[Command]) -> bool:
        """Queue commands in the engine process; False once it is gone."""
        if not commands:
            return True
        for c in commands:  # outputs come back without the prompt: it is kept here
            if isinstance(c, Add):
                self._prompts[c.request_id] = (c.prompt.get("prompt"),
                                               c.prompt["prompt_token_ids"])
        try:
            with self._tx_lock:
                self._cmd_w.send(commands)
            return True
        except (BrokenPipeError, OSError):
            return False

    def _receive(self, on_events: Callable[..., None],
                 on_dead: Callable[[BaseException], None],
                 on_control: Callable[[list], None] | None) -> None:
        clean = False
        reason = "the engine process died"
        while True:
            try:
                message = self._evt_r.recv()
            except (EOFError, OSError):
                break
            if message[0] == "exit":
                clean = True
                break
            if message[0] == "dead":
                reason = message[1]
                break
            if message[0] == "control":
                if on_control is not None:
                    try:
                        on_control(message[1])
                    except Exception:
                        logger.exception("control message handler failed")
                continue
            _, refs, packed, stats, num_waiting = message
            outputs = [self._unpack(p) for p in packed]
            for rid, item in refs:
                if not isinstance(item, int):  # an error ends the request: forget it
                    self._prompts.pop(rid, None)
                    self._prompt_logprobs.pop(rid, None)
            events = [(rid, outputs[item] if isinstance(item, int) else item)
                      for rid, item in refs]
            on_events(events, outputs, stats, num_waiting)
        self.alive = False
        if not clean:
            logger.error("%s (engine process exit code %s)", reason, self._exitcode())
            on_dead(EngineError(reason))

    def _unpack(self, packed: tuple) -> RequestOutput:
        rid, finished, delta, cached, metrics, choices, prompt_logprobs = packed
        if prompt_logprobs is not None:
            self._prompt_logprobs[rid] = prompt_logprobs
        prompt, prompt_ids = (self._prompts.pop(rid, (None, [])) if finished
                              else self._prompts.get(rid, (None, [])))
        lps = (self._prompt_logprobs.pop(rid, None) if finished
               else self._prompt_logprobs.get(rid))
        return RequestOutput(rid, prompt, prompt_ids, lps,
                             [CompletionOutput(*c) for c in choices], finished,
                             RequestMetrics(*metrics), cached, delta)

    def join(self, timeout: float) -> None:
        """Wait for the engine process to end (after an Exit); kill it past `timeout`."""
        if self._proc is None:
            return
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        if self._rx is not None:
            self._rx.join(5)
