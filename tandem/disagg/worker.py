"""The roles of a disaggregated engine process (`tandem serve --prefill-workers P
--decode-workers D`): what a worker does besides being an engine, and the messages it
exchanges with the front end (disagg/frontend.py).

    front end                 decode worker (DecodeSide)            prefill worker (PrefillSide)
    Add(disagg=RouteHint) --> rule on its own cache: local -> queue
                              remote -> WAITING_FOR_KV, its cached
                              prefix pinned     --Routed(remote, skip)-->
    Add(disagg=ShipTo)  ------------------------------------------->  prompt as a one-token
                                                                      request; when it ends:
                              KVReceiver polls  <==shared memory====  blocks past `skip` sent
                              the connector: imports, queues it  <--Shipped(ok, bytes, s)--
    KVFailed (a failed ship or a dead prefill worker) --> prefills it itself
    (workers on one GPU: the payload rides in Shipped as CUDA IPC handles and goes on to the
    decode worker as KVReady, which copies it device to device: no file, no host copy)

The decode worker applies the rule because it alone knows its cache exactly (the uncached
part of the prompt, and which blocks need not move); the front end picks the workers and
passes the prefill side's load with the request (Dynamo's split). Routed and Shipped go to
the front end as control messages (engine/core_process.py), beside the request events.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tandem.disagg import transfer
from tandem.disagg.connector import SharedMemoryConnector, pack
from tandem.disagg.p2p import P2PGroup, P2PLink
from tandem.disagg.policy import DisaggPolicy, transferable
from tandem.disagg.receiver import KVReceiver
from tandem.engine.engine_loop import KVReady
from tandem.outputs import RequestOutput

logger = logging.getLogger(__name__)
ROLES = ("prefill", "decode")


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What an engine process is, given by the front end at spawn."""
    role: str  # "prefill" or "decode"
    index: int  # among the workers of its role
    namespace: str  # a decode worker's connector namespace (payloads addressed to it)
    kv_timeout_s: float = 30.0  # decode: wait this long for KV that was sent, then prefill
    cuda_device: int | None = None  # the GPU this worker uses (CUDA_VISIBLE_DEVICES)
    p2p: P2PGroup | None = None  # the point-to-point group, if any pair uses "nccl"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker role must be one of {ROLES}, got {self.role!r}")


# ---- front end -> workers (with an Add: engine_loop.Add.disagg) ---------------------------
@dataclass(frozen=True, slots=True)
class RouteHint:
    """To a decode worker: apply the rule to this request."""
    policy: DisaggPolicy
    prefill_queue_tokens: int  # prompt tokens the least-loaded prefill worker has queued
    prefill_available: bool  # some prefill worker is alive


@dataclass(frozen=True, slots=True)
class ShipTo:
    """To a prefill worker: once this one-token request's prefill is done, send its prompt
    blocks past `skip` to the decode worker's connector."""
    namespace: str  # the decode worker's connector namespace
    request_id: str  # the request's id on the decode worker (the payload's name)
    skip: int  # leading prompt blocks the decode worker holds (pinned there): not sent
    # "shm": a shared-memory file; "ipc": inside the Shipped message (CUDA IPC handles when
    # both workers use the same GPU: the decode worker copies device to device); "nccl": a
    # point-to-point send to rank `dst_rank` (p2p.py), announced by the Shipped message
    via: str = "shm"
    dst_rank: int = -1


# ---- workers -> front end (control messages) ---------------------------------------------
@dataclass(frozen=True, slots=True)
class Routed:
    """A decode worker's decision for one request."""
    request_id: str
    remote: bool  # True: it waits for KV; the front end hands it to a prefill worker
    skip: int  # prompt blocks the decode worker holds already (remote only)


@dataclass(frozen=True, slots=True)
class Shipped:
    """A prefill worker's transfer of one request's KV."""
    request_id: str  # the decode-side id
    ok: bool  # False: nothing was sent (the prefill failed, or its blocks were evicted)
    num_blocks: int
    num_bytes: int
    seconds: float  # export (gather on the device) and send
    # "ipc": the payload itself (connector.pack); "nccl": the send's header (p2p.py)
    blob: bytes | None = None
    via: str = "shm"


@dataclass(frozen=True, slots=True)
class Settled:
    """A decode worker's remote request stopped waiting for KV."""
    request_id: str
    imported: bool  # False: a fallback (failed, timed out, or no room): prefilled locally
    seconds: float  # receiving and writing the blocks into the pool


class DecodeSide:
    """A decode worker: routes the requests that carry a RouteHint, receives KV."""

    def __init__(self, engine, role: WorkerRole, link: P2PLink | None = None) -> None:
        self.receiver = engine.kv_receiver = KVReceiver(
            SharedMemoryConnector(role.namespace), role.kv_timeout_s)
        self.link = link
        self._control: list[Routed] = []

    def add(self, engine, command) -> None:
        hint: RouteHint = command.disagg
        tokens, sp = command.prompt["prompt_token_ids"], command.params
        kv, remote, held = engine.scheduler.kv, False, 0
        if hint.prefill_available and transferable(sp, engine.config.cache.enable_prefix_caching):
            hashes = kv.prompt_block_hashes(tokens)
            held = kv.cached_prefix(hashes)
            remote = held < len(hashes) and hint.policy.route(
                len(tokens), held * engine.config.cache.block_size,
                hint.prefill_queue_tokens) == "remote"
        engine.add_request(command.request_id, command.prompt, sp, command.arrival_time,
                           awaiting_kv=remote)
        if remote:
            self.receiver.hold(command.request_id, kv.pin_cached(hashes[:held]))
        self._control.append(Routed(command.request_id, remote, held))

    def kv_message(self, command) -> None:
        """engine_loop.KVFailed (prefill here) or KVReady (the payload, as a message)."""
        if isinstance(command, KVReady) and command.via == "nccl":
            # received now, in the order sent, whether or not the request still waits
            self.receiver.deliver(command.request_id,
                                  self.link.recv(command.request_id, command.blob))
        elif isinstance(command, KVReady):
            self.receiver.deliver(command.request_id, command.blob)
        else:
            self.receiver.fail(command.request_id)

    def after_step(self, engine, outputs: list[RequestOutput]) -> None:
        pass

    def take_control(self) -> list:
        settled, self.receiver.settled = self.receiver.settled, []
        out, self._control = self._control + [Settled(*s) for s in settled], []
        return out


class PrefillSide:
    """A prefill worker: prefills one-token requests and ships their prompt blocks. Its
    engine runs synchronous steps, so a finished prompt's blocks are still in the prefix
    cache when `after_step` reads them (nothing has been scheduled since)."""

    def __init__(self, engine, role: WorkerRole, link: P2PLink | None = None) -> None:
        self.link = link
        self._ships: dict[str, tuple[ShipTo, list[int]]] = {}  # request id -> (where, hashes)
        self._connectors: dict[str, SharedMemoryConnector] = {}
        self._control: list[Shipped] = []

    def add(self, engine, command) -> None:
        ship: ShipTo = command.disagg
        tokens = command.prompt["prompt_token_ids"]
        engine.add_request(command.request_id, command.prompt, command.params,
                           command.arrival_time)
        self._ships[command.request_id] = (ship, transfer.prompt_hashes(engine, tokens))

    def kv_message(self, command) -> None:
        pass

    def after_step(self, engine, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if not out.finished or out.request_id not in self._ships:
                continue
            ship, hashes = self._ships.pop(out.request_id)
            done = out.outputs and out.outputs[0].finish_reason in ("length", "stop")
            self._control.append(self._ship(engine, out.request_id, ship, hashes)
                                 if done else Shipped(ship.request_id, False, 0, 0, 0.0))
        if self.link is not None:
            self.link.reap()
        live = engine.scheduler.requests
        if len(self._ships) > len(live):  # aborted ones: nothing to send
            for rid in [r for r in self._ships if r not in live]:
                del self._ships[rid]

    def _ship(self, engine, rid: str, ship: ShipTo, hashes: list[int]) -> Shipped:
        t0 = time.perf_counter()
        try:
            payload = transfer.export_prompt(engine, ship.request_id, hashes, ship.skip)
            blob = None
            if payload is not None and ship.via == "ipc":
                blob = pack(payload)
            elif payload is not None and ship.via == "nccl":
                blob = self.link.send(payload, ship.dst_rank)
            elif payload is not None:
                connector = self._connectors.get(ship.namespace)
                if connector is None:
                    connector = self._connectors[ship.namespace] = \
                        SharedMemoryConnector(ship.namespace)
                connector.send(payload)
        except Exception:  # the decode worker falls back; this worker carries on
            logger.exception("shipping the KV of %s failed", rid)
            payload = None
        seconds = time.perf_counter() - t0
        if payload is None:
            return Shipped(ship.request_id, False, 0, 0, seconds)
        return Shipped(ship.request_id, True, len(payload.hashes), payload.nbytes, seconds,
                       blob, ship.via)

    def take_control(self) -> list:
        out, self._control = self._control, []
        return out


def make_side(engine, role: WorkerRole) -> DecodeSide | PrefillSide:
    link = P2PLink(role.p2p, engine.executor.device) if role.p2p is not None else None
    return (PrefillSide if role.role == "prefill" else DecodeSide)(engine, role, link)
