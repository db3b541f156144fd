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

import time

from tandem.disagg import transfer
from tandem.disagg.connector import KVConnector


class KVReceiver:
    def __init__(self, connector: KVConnector, timeout_s: float = 30.0) -> None:
        self.connector, self.timeout_s = connector, timeout_s
        self._since: dict[str, float] = {}
        self._settled: dict[str, bool] = {}  # request id -> proceed without a payload
        self.stats = {"imported": 0, "fallback": 0, "imported_bytes": 0}

    def release(self, request_id: str) -> None:
        """Nothing will be sent for it (the decode engine holds the blocks already)."""
        self._settled[request_id] = False

    def fail(self, request_id: str) -> None:
        """Its prefill or transfer failed: prefill it here."""
        self._settled[request_id] = True

    def poll(self, engine) -> None:
        now = time.monotonic()
        awaiting = engine.scheduler.awaiting_kv()
        for rid in set(self._since) - set(awaiting):  # ended (aborted) while waiting
            self.connector.discard(rid)
            self._since.pop(rid)
            self._settled.pop(rid, None)
        for rid in awaiting:
            started = self._since.setdefault(rid, now)
            payload = self.connector.recv(rid)
            if payload is not None and transfer.import_payload(engine, payload):
                self.stats["imported"] += 1
                self.stats["imported_bytes"] += payload.nbytes
            elif payload is not None or self._settled.get(rid, False) or (
                    rid not in self._settled and now - started > self.timeout_s):
                self.stats["fallback"] += 1
            elif rid not in self._settled:
                continue  # still on its way
            engine.scheduler.kv_arrived(rid)
            self._since.pop(rid, None)
            self._settled.pop(rid, None)
