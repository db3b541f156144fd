"""KVConnector: how a request's KV blocks travel from the prefill engine to the decode
engine.

    send(payload)           the blocks (hashes + per-layer tensors) of one request
    recv(request_id)        the payload, or None if it never arrived (the caller falls back
                            to prefilling locally)
    discard(request_id)     drop a payload whose request ended before receiving it

`SharedMemoryConnector` (one machine, any processes): one POSIX shared-memory segment per
request, named from the request id, laid out as

    | header length (8 bytes, little-endian) | msgpack header | layer 0 bytes | layer 1 ...

with the header {hashes, layers: [[dtype, shape], ...]}; the receiver copies the bytes out,
then unlinks the segment. Tensors travel as their raw bytes (bf16 and e4m3 alike).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import msgpack
import torch


@dataclass(frozen=True, slots=True)
class KVPayload:
    request_id: str
    hashes: list[int]  # the blocks' chained hashes, in prompt order
    layers: list[torch.Tensor]  # per layer (2, len(hashes), block_size, kv_heads, head_dim)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)


class KVConnector:
    def send(self, payload: KVPayload) -> None:
        raise NotImplementedError

    def recv(self, request_id: str) -> KVPayload | None:
        raise NotImplementedError

    def discard(self, request_id: str) -> None:
        """Drop what was sent for a request that ended before receiving it."""


class SharedMemoryConnector(KVConnector):
    def __init__(self, namespace: str) -> None:
        """`namespace`: the same on both sides (segment names derive from it)."""
        self.namespace = namespace

    def _name(self, request_id: str) -> str:
        digest = hashlib.sha256(f"{self.namespace}/{request_id}".encode()).hexdigest()[:24]
        return f"tkv{digest}"  # short and free of "/" whatever the ids are

    def send(self, payload: KVPayload) -> None:
        raw = [t.contiguous().view(torch.uint8).reshape(-1) for t in payload.layers]
        header = msgpack.packb({
            "hashes": [h.to_bytes(32, "little") for h in payload.hashes],
            "layers": [[str(t.dtype).removeprefix("torch."), list(t.shape)]
                       for t in payload.layers]})
        size = 8 + len(header) + sum(r.numel() for r in raw)
        name = self._name(payload.request_id)
        try:
            shm = shared_memory.SharedMemory(name, create=True, size=size)
        except FileExistsError:  # an earlier attempt's, never received: replace it
            self.discard(payload.request_id)
            shm = shared_memory.SharedMemory(name, create=True, size=size)
        # The receiver unlinks it; the tracker must not do it when this process exits.
        resource_tracker.unregister(shm._name, "shared_memory")
        try:
            buf = shm.buf
            buf[:8] = len(header).to_bytes(8, "little")
            buf[8:8 + len(header)] = header
            at = 8 + len(header)
            for r in raw:
                n = r.numel()
                torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=at).copy_(r)
                at += n
        finally:
            del buf
            shm.close()

    def recv(self, request_id: str) -> KVPayload | None:
        try:
            shm = shared_memory.SharedMemory(self._name(request_id))
        except FileNotFoundError:
            return None
        try:  # (unlink below also ends this process's tracking of it)
            buf = shm.buf
            n = int.from_bytes(buf[:8], "little")
            header = msgpack.unpackb(bytes(buf[8:8 + n]))
            at, layers = 8 + n, []
            for dtype_name, shape in header["layers"]:
                dtype = getattr(torch, dtype_name)
                count = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                raw = torch.frombuffer(buf, dtype=torch.uint8, count=count, offset=at).clone()
                layers.append(raw.view(dtype).reshape(shape))
                at += count
            hashes = [int.from_bytes(h, "little") for h in header["hashes"]]
        finally:
            del buf
            shm.close()
            shm.unlink()
        return KVPayload(request_id, hashes, layers)

    def discard(self, request_id: str) -> None:
        """Drop a payload nobody will receive (its request ended), if it is there."""
        try:
            shm = shared_memory.SharedMemory(self._name(request_id))
        except FileNotFoundError:
            return
        shm.close()
        shm.unlink()

