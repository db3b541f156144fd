"""The decode engine's side of disaggregation: requests whose prompt KV comes from a
prefill engine wait aside (the scheduler's WAITING_FOR_KV state, never in front of other
admissions); every engine step polls the connector for them:

    arrived   import the blocks (transfer.py: prefix-cache blocks) -> the request joins
              the waiting queue and finds them as a prefix hit
    released  nothing to move (the engine held every block already) -> joins the queue
    failed, or nothing after timeout_s, or no room for the blocks -> joins the queue and
              prefills here (a fallback: counted, nothing lost)
"""

from __future__ import annotations

import logging
import time

from tandem.disagg import transfer
from tandem.disagg.connector import KVConnector, KVPayload, unpack

logger = logging.getLogger(__name__)


class KVReceiver:
    def __init__(self, connector: KVConnector, timeout_s: float = 30.0) -> None:
        self.connector, self.timeout_s = connector, timeout_s
        self._since: dict[str, float] = {}
        self._settled: dict[str, bool] = {}  # request id -> proceed without a payload
        # request id -> the blocks of its prompt this engine held when it was routed
        # remote, pinned so the transfer (which skips them) still finds them here
        self._held: dict[str, list[int]] = {}
        self.stats = {"imported": 0, "fallback": 0, "imported_bytes": 0}
        # (request id, imported, seconds the import took) of the requests that left
        # WAITING_FOR_KV, for the front end's accounting (disagg/worker.py drains it)
        self.settled: list[tuple[str, bool, float]] = []
        # request id -> a payload that came as a message (connector.pack's bytes, or one
        # received point to point), not a file
        self._delivered: dict[str, bytes | KVPayload] = {}

    def deliver(self, request_id: str, payload: bytes | KVPayload) -> None:
        """A payload that came with a message (CUDA IPC handles, the bytes on a CPU, or a
        point-to-point receive)."""
        self._delivered[request_id] = payload

    def hold(self, request_id: str, block_ids: list[int]) -> None:
        """Keep `block_ids` (pinned by the caller) until the request's KV arrives."""
        self._held[request_id] = block_ids

    def release(self, request_id: str) -> None:
        """Nothing will be sent for it (the decode engine holds the blocks already)."""
        self._settled[request_id] = False

    def fail(self, request_id: str) -> None:
        """Its prefill or transfer failed: prefill it here."""
        self._settled[request_id] = True

    def poll(self, engine) -> None:
        awaiting = engine.scheduler.awaiting_kv()
        if not awaiting and not (self._since or self._settled or self._held
                                 or self._delivered):
            return  # the common step of a decode worker: nothing in flight
        now = time.monotonic()
        # ended (aborted) while waiting, or settled after it ended
        for rid in (set(self._since) | set(self._settled) | set(self._held)
                    | set(self._delivered)) - set(awaiting):
            self.connector.discard(rid)
            self._since.pop(rid, None)
            self._settled.pop(rid, None)
            self._delivered.pop(rid, None)
            engine.scheduler.kv.unpin(self._held.pop(rid, []))
        for rid in awaiting:
            started = self._since.setdefault(rid, now)
            imported = failed = False
            t0 = time.perf_counter()
            try:
                blob = self._delivered.pop(rid, None)
                payload = (self.connector.recv(rid) if blob is None else
                           unpack(blob) if isinstance(blob, bytes) else blob)
                imported = payload is not None and transfer.import_payload(engine, payload)
                failed = payload is not None and not imported  # no room for it
                del blob
            except Exception:  # this request prefills here; the others carry on
                logger.exception("receiving the KV of %s failed; prefilling it here", rid)
                failed = True
            if imported:
                self.stats["imported"] += 1
                self.stats["imported_bytes"] += payload.nbytes
            elif failed or self._settled.get(rid, False) or (
                    rid not in self._settled and now - started > self.timeout_s):
                self.stats["fallback"] += 1
            elif rid not in self._settled:
                continue  # still on its way
            else:
                imported = True  # released: every block was here already
            self.settled.append((rid, imported, time.perf_counter() - t0))
            engine.scheduler.kv_arrived(rid)
            self._since.pop(rid, None)
            self._settled.pop(rid, None)
            engine.scheduler.kv.unpin(self._held.pop(rid, []))
