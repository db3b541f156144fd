"""`DisaggAsyncEngine`: the served form of disaggregation. P prefill and D decode workers,
each an engine process (engine/core_process.py), behind `AsyncEngine`'s interface, so the
HTTP server (server/) runs on it unchanged.

    generate(request)
      1. pick the decode worker with the fewest live requests; hand it the request with a
         RouteHint (the rule, and the least-loaded prefill worker's queued prompt tokens)
      2. the decode worker applies the rule to its own cache (disagg/worker.py):
           local   it prefills and decodes, as a plain engine would
           remote  the request waits for KV there; Routed(remote, skip) comes back
      3. remote: the least-loaded prefill worker gets the prompt as a one-token request with
         ShipTo(decode worker, skip); when its prefill ends it sends the blocks past `skip`
         through shared memory, and the decode worker imports them and goes on
      4. the decode worker's outputs stream back to the caller, as with one engine

Faults: a prefill worker that dies, fails a request or cannot ship its KV leaves each of
its requests to its decode worker (KVFailed: it prefills locally; nothing is lost or done
twice), and later requests are routed locally while no prefill worker is left. /health
says "degraded" then (still 200); it turns 503 only when no decode worker is left, which
also ends the server (`on_dead`), as a dead engine does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from tandem.config import EngineConfig
from tandem.disagg.config import DisaggConfig
from tandem.disagg.metrics import DisaggMetrics
from tandem.disagg.p2p import P2PGroup
from tandem.disagg.remote import RemoteCore
from tandem.disagg.worker import Routed, RouteHint, Settled, Shipped, ShipTo, WorkerRole
from tandem.engine.async_engine import AsyncEngine, EngineStopped, StepHook
from tandem.engine.stats import EngineStats, merge_stats
from tandem.outputs import RequestOutput
from tandem.request import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)
# The prefill worker's request: its prompt and one (discarded) token; the decode worker
# samples the request's first token itself, so greedy and seeded outputs match one engine.
_ONE_TOKEN = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)


@dataclasses.dataclass(slots=True)
class _Live:
    """A request in flight, by its id."""
    decode: int  # its decode worker
    token_ids: list[int]
    prefill: int | None = None  # its prefill worker, while it prefills remotely


class DisaggAsyncEngine:
    def __init__(self, config: EngineConfig, layout: DisaggConfig,
                 on_step: StepHook | None = None, log_level: int = logging.INFO,
                 metrics: DisaggMetrics | None = None, num_gpus: int | None = None) -> None:
        """num_gpus: GPUs to spread the workers over (decode workers first, round robin);
        None: all visible ones if the engine runs on CUDA. metrics: where the routes and
        transfers are counted (the server's registry; a private one if None)."""
        self.policy = layout.policy()
        self.kv_connector = layout.kv_connector
        self.on_step = on_step
        self.on_dead: Callable[[BaseException], None] | None = None
        self.metrics = metrics or DisaggMetrics("default", CollectorRegistry())
        gpus = _gpus(config) if num_gpus is None else num_gpus
        decode_cfg = config
        prefill_cfg = dataclasses.replace(  # see PrefillSide: steps one at a time
            config, scheduler=dataclasses.replace(config.scheduler, async_scheduling=False))
        # local decode workers, remote decode workers, local prefill, remote prefill
        remote = layout.remote_workers
        roles = [(WorkerRole("decode", i, f"{uuid.uuid4().hex[:12]}d{i}",
                             layout.kv_transfer_timeout), None)
                 for i in range(layout.decode_workers)]
        roles += [(WorkerRole("decode", len(roles) + i, f"{uuid.uuid4().hex[:12]}r{i}",
                              layout.kv_transfer_timeout), addr)
                  for i, (_, addr) in enumerate(r for r in remote if r[0] == "decode")]
        roles += [(WorkerRole("prefill", j, ""), None) for j in range(layout.prefill_workers)]
        roles += [(WorkerRole("prefill", layout.prefill_workers + j, ""), addr)
                  for j, (_, addr) in enumerate(r for r in remote if r[0] == "prefill")]
        self.addresses = [addr for _, addr in roles]  # None: spawned here
        local = [k for k, addr in enumerate(self.addresses) if addr is None]
        roles = [dataclasses.replace(r, cuda_device=local.index(k) % gpus
                                     if gpus and addr is None else None)
                 for k, (r, addr) in enumerate(roles)]
        any_prefill = layout.prefill_workers or any(r[0] == "prefill" for r in remote)
        if any_prefill and (self.kv_connector == "nccl" or remote or (
                self.kv_connector == "auto" and min(gpus, len(roles)) > 1)):
            host = layout.kv_group_address or "127.0.0.1"
            init = f"tcp://{host}:{_free_port()}"  # the point-to-point group (p2p.py)
            roles = [dataclasses.replace(r, p2p=P2PGroup(init, k, len(roles)))
                     for k, r in enumerate(roles)]
        self.workers: list[AsyncEngine] = []
        self.roles: list[WorkerRole] = []
        for k, role in enumerate(roles):
            cfg = decode_cfg if role.role == "decode" else prefill_cfg
            if self.addresses[k] is None:
                w = AsyncEngine.in_process(cfg, self._hook(k), log_level, role)
            else:
                w = AsyncEngine(None, self._hook(k),
                                core=RemoteCore(cfg, self.addresses[k], log_level, role))
            w.on_control = self._control_handler(k)
            w.on_dead = self._dead_handler(k)
            self.workers.append(w)
            self.roles.append(role)
        self.decode = [k for k, r in enumerate(self.roles) if r.role == "decode"]
        self.prefill = [k for k, r in enumerate(self.roles) if r.role == "prefill"]
        first = self.workers[0]
        self.inputs, self.tokenizer = first.inputs, first.tokenizer
        self.max_model_len, self.vocab_size = first.max_model_len, first.vocab_size
        self.config = first.config
        self._live: dict[str, _Live] = {}
        self._dest: dict[str, int] = {}  # request id -> decode worker, while it is shipped
        self._queued = [0] * len(self.workers)  # prompt tokens sent to each prefill worker
        self._stats: dict[int, EngineStats] = {}  # the decode workers' latest
        self._stats_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = self._stopping = False

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start every worker (in parallel; each loads the model). ValueError if one fails."""
        if self._started:
            return
        results: dict[int, BaseException | None] = {}
        done = threading.Condition()

        def start_one(k: int) -> None:
            error: BaseException | None = None
            try:
                self.workers[k].start()
            except BaseException as e:
                error = e
            with done:
                results[k] = error
                done.notify()

        for k in range(len(self.workers)):  # daemons: a failed start does not wait for them
            threading.Thread(target=start_one, args=(k,), daemon=True,
                             name=f"tandem-start-{k}").start()
        with done:  # all ready, or the first failure (the others may wait on it forever)
            while len(results) < len(self.workers) and not any(results.values()):
                done.wait()
        errors = [e for e in results.values() if e is not None]
        if errors:  # (the workers that did start are daemons: they end with this process)
            raise ValueError(f"a disaggregation worker failed to start: {errors[0]}")
        self._started = True
        for k in range(len(self.workers)):
            self._report(k)

    @property
    def is_running(self) -> bool:
        return self._started and not self._stopping and any(
            self.workers[k].is_running for k in self.decode)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(serving, the /health body): "degraded" while some worker is down."""
        workers = [{"role": r.role, "index": r.index, "alive": w.is_running,
                    "pid": w.describe().get("pid"), "device": w.describe().get("device"),
                    "address": f"{a[0]}:{a[1]}" if a else None}
                   for w, r, a in zip(self.workers, self.roles, self.addresses)]
        ok = self.is_running
        status = ("stopping" if not ok else
                  "ok" if all(w["alive"] for w in workers) else "degraded")
        return ok, {"status": status, "workers": workers}

    def describe(self) -> dict[str, Any]:
        info = dict(self.workers[self.decode[0]].describe())
        pids = ", ".join(f"{r.role}{r.index} {w.describe().get('pid')}"
                         for w, r in zip(self.workers, self.roles))
        info["layout"] = (f"{len(self.prefill)} prefill + {len(self.decode)} decode worker "
                          f"processes ({pids}), disagg policy {self.policy.policy}")
        return info

    @property
    def num_live_requests(self) -> int:
        return len(self._live)

    @property
    def num_waiting_requests(self) -> int:
        return sum(self.workers[k].num_waiting_requests for k in self.decode)

    async def shutdown(self, timeout: float = 0.0) -> None:
        self._stopping = True
        deadline = time.monotonic() + timeout
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.gather(*(w.shutdown(0.0) for w in self.workers))

    async def run_blocking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self.workers[self.decode[0]].run_blocking(fn, *args, **kwargs)

    # ---- requests (event loop) -----------------------------------------------------------
    def prepare(self, prompt: Any, params: SamplingParams) -> tuple[str | None, list[int]]:
        return self.workers[self.decode[0]].prepare(prompt, params)

    async def generate(self, request_id: str, prompt: Any, params: SamplingParams,
                       arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """AsyncEngine.generate's contract, over the workers."""
        if not self.is_running:
            raise EngineStopped("the server is shutting down, or no decode worker is left")
        self._loop = asyncio.get_running_loop()
        text, token_ids = self.prepare(prompt, params)
        if request_id in self._live:
            raise ValueError(f"request_id {request_id!r} is already in use")
        d = min((k for k in self.decode if self.workers[k].is_running),
                key=lambda k: self.workers[k].num_live_requests)
        alive = [k for k in self.prefill if self.workers[k].is_running]
        hint = RouteHint(self.policy, min((self._queued[k] for k in alive), default=0),
                         bool(alive)) if self.prefill else None
        self._live[request_id] = _Live(d, token_ids)
        try:
            async for out in self.workers[d].generate(
                    request_id, {"prompt": text, "prompt_token_ids": token_ids}, params,
                    arrival_time, hint):
                yield out
        finally:
            live = self._live.pop(request_id, None)
            if live is not None and live.prefill is not None:
                self.workers[live.prefill].abort(_prefill_id(request_id))

    def abort(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is None:
            return
        self.workers[live.decode].abort(request_id)
        if live.prefill is not None:
            self.workers[live.prefill].abort(_prefill_id(request_id))

    # ---- the workers' messages -----------------------------------------------------------
    def _control_handler(self, k: int) -> Callable[[list], None]:
        def handle(messages: list) -> None:  # the worker's rx thread: over to the loop
            loop = self._loop
            if loop is None:
                return
            try:
                loop.call_soon_threadsafe(self._on_control, k, messages)
            except RuntimeError:  # the loop is closed
                pass
        return handle

    def _on_control(self, k: int, messages: list) -> None:
        for m in messages:
            if isinstance(m, Routed):
                self._count("remote" if m.remote else "local")
                if m.remote:
                    self._start_prefill(k, m)
            elif isinstance(m, Settled):
                if not m.imported:
                    self._count("fallback")
                else:
                    self.metrics.import_seconds.observe(m.seconds)
            elif isinstance(m, Shipped):
                self._shipped(m)

    def _start_prefill(self, d: int, routed: Routed) -> None:
        live = self._live.get(routed.request_id)
        if live is None:  # ended meanwhile
            return
        alive = [k for k in self.prefill if self.workers[k].is_running]
        if not alive:
            self.workers[d].kv_failed(routed.request_id)
            return
        p = min(alive, key=lambda k: self._queued[k])
        live.prefill = p
        asyncio.ensure_future(self._prefill(p, d, routed, live.token_ids))

    async def _prefill(self, p: int, d: int, routed: Routed, token_ids: list[int]) -> None:
        rid = routed.request_id
        self._queued[p] += len(token_ids)
        ship = ShipTo(self.roles[d].namespace, rid, routed.skip, self._via(p, d), d)
        self._dest[rid] = d
        shipping = False  # a finished prefill: its Shipped message follows
        try:
            async for out in self.workers[p].generate(_prefill_id(rid),
                                                      {"prompt_token_ids": token_ids},
                                                      _ONE_TOKEN, None, ship):
                shipping = out.finished and out.outputs[0].finish_reason in ("length", "stop")
        except Exception as e:  # a failed request or a dead worker: prefill at decode
            logger.warning("remote prefill of %s failed (%s); the decode worker prefills it",
                           rid, e)
            self.workers[d].kv_failed(rid)
        finally:
            self._queued[p] -= len(token_ids)
            if not shipping:  # aborted or failed: no Shipped will come
                self._dest.pop(rid, None)
            live = self._live.get(rid)
            if live is not None:
                live.prefill = None

    def _via(self, p: int, d: int) -> str:
        """auto: ipc where both workers use one GPU, nccl between two GPUs, else shared
        memory."""
        if self.kv_connector != "auto":
            return self.kv_connector
        if self.addresses[p] is not None or self.addresses[d] is not None:
            return "nccl"  # another machine, maybe
        gp, gd = self.roles[p].cuda_device, self.roles[d].cuda_device
        if gp is None or gd is None:
            return "shm"
        return "ipc" if gp == gd else "nccl" if self.roles[p].p2p is not None else "shm"

    def _shipped(self, m: Shipped) -> None:
        live = self._live.get(m.request_id)
        d = self._dest.pop(m.request_id, None)
        if m.ok and m.blob is not None and d is not None:
            # always, even if the request ended: a point-to-point send must be received
            self.workers[d].kv_ready(m.request_id, m.blob, m.via)
        if not m.ok:
            self.metrics.failures.inc()
            if live is not None:
                self.workers[live.decode].kv_failed(m.request_id)
            return
        self.metrics.bytes.inc(m.num_bytes)
        self.metrics.blocks.inc(m.num_blocks)
        self.metrics.seconds.observe(m.seconds)

    def _count(self, route: str) -> None:
        self.metrics.routes[route].inc()

    def _hook(self, k: int) -> StepHook:
        def on_step(outputs: list[RequestOutput], stats: EngineStats) -> None:
            role = self.roles[k]
            self.metrics.worker(role.role, role.index, True, stats)
            if role.role != "decode":  # prefill workers' requests are internal
                return
            with self._stats_lock:  # the decode workers' rx threads
                self._stats[k] = stats
                if self.on_step is not None:
                    self.on_step(outputs, merge_stats(list(self._stats.values())))
        return on_step

    def _dead_handler(self, k: int) -> Callable[[BaseException], None]:
        def on_dead(error: BaseException) -> None:
            role = self.roles[k]
            logger.error("%s worker %d died (%s)", role.role, role.index, error)
            self._report(k)
            if role.role == "decode" and not any(self.workers[j].is_running
                                                 for j in self.decode):
                if self.on_dead is not None:
                    self.on_dead(error)
        return on_dead

    def _report(self, k: int) -> None:
        r = self.roles[k]
        self.metrics.worker(r.role, r.index, self.workers[k].is_running)


def _prefill_id(request_id: str) -> str:
    return f"{request_id}@prefill"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpus(config: EngineConfig) -> int:
    if config.model.device not in ("auto", "cuda"):  # cpu, or one GPU named: no spreading
        return 0
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
