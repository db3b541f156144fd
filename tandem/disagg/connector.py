"""KVConnector: how a request's KV blocks travel from the prefill engine to the decode
engine.

    send(payload)           the blocks (hashes + per-layer tensors) of one request
    recv(request_id)        the payload, or None if it never arrived (the caller falls back
                            to prefilling locally)
    discard(request_id)     drop a payload whose request ended before receiving it

Or a payload travels inside a message (`pack` / `unpack`, disagg/worker.py's "ipc" path):
on a GPU as CUDA IPC handles, so the receiver copies device to device straight out of the
sender's memory (torch keeps that memory alive until the receiver lets go); on a CPU by
value. For workers sharing one GPU.

`SharedMemoryConnector` (one machine, any processes): one file per request in shared
memory (/dev/shm, POSIX shared memory's home on Linux), named from the request id, mapped
by both sides and laid out as

    | ready (1 byte) | 7 bytes | header length (8, little-endian) | msgpack header |
    | layer 0 bytes | layer 1 ...       (each layer from a 64-byte boundary)

with the header {hashes, layers: [[dtype, shape], ...]}. Each side copies once: the
sender from its KV pool (device or host) straight into the mapping, the receiver from the
mapping straight into its pool. The sender sets the ready byte last; a receiver that
finds the file before that leaves it for its next poll; one that reads it unlinks it at
once (its mapping lives as long as the payload's tensors). Tensors travel as their raw
bytes (bf16 and e4m3 alike).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from dataclasses import dataclass

import msgpack
import torch


_HEAD = 16  # ready byte, padding, header length
_SHM = "/dev/shm"


def _aligned(offset: int) -> int:
    """Each layer starts on a 64-byte boundary (any dtype can view it)."""
    return -(-offset // 64) * 64


@dataclass(frozen=True, slots=True)
class KVPayload:
    request_id: str
    hashes: list[int]  # the blocks' chained hashes, in prompt order
    layers: list[torch.Tensor]  # per layer (2, len(hashes), block_size, kv_heads, head_dim)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)


def pack(payload: KVPayload) -> bytes:
    """The payload as bytes for a message: CUDA tensors as IPC handles (torch's reductions;
    the sender's memory stays alive until the receiver frees its view), others by value."""
    if payload.layers and payload.layers[0].is_cuda:
        import torch.multiprocessing  # noqa: F401  (registers the CUDA IPC reductions)
        from multiprocessing.reduction import ForkingPickler
        return bytes(ForkingPickler.dumps(payload))
    return pickle.dumps(payload)


def unpack(blob: bytes) -> KVPayload:
    import torch.multiprocessing  # noqa: F401
    return pickle.loads(blob)


class KVConnector:
    def send(self, payload: KVPayload) -> None:
        raise NotImplementedError

    def recv(self, request_id: str) -> KVPayload | None:
        raise NotImplementedError

    def discard(self, request_id: str) -> None:
        """Drop what was sent for a request that ended before receiving it."""


class SharedMemoryConnector(KVConnector):
    def __init__(self, namespace: str, directory: str | None = None) -> None:
        """`namespace`: the same on both sides (file names derive from it)."""
        self.namespace = namespace
        self.directory = directory or (_SHM if os.path.isdir(_SHM) else tempfile.gettempdir())

    def _path(self, request_id: str) -> str:
        digest = hashlib.sha256(f"{self.namespace}/{request_id}".encode()).hexdigest()[:24]
        return os.path.join(self.directory, f"tkv{digest}")  # free of "/" whatever the ids

    def send(self, payload: KVPayload) -> None:
        raw = [t.contiguous().view(torch.uint8).reshape(-1) for t in payload.layers]
        header = msgpack.packb({
            "hashes": [h.to_bytes(32, "little") for h in payload.hashes],
            "layers": [[str(t.dtype).removeprefix("torch."), list(t.shape)]
                       for t in payload.layers]})
        size = _HEAD + len(header)
        for r in raw:
            size = _aligned(size) + r.numel()
        path = self._path(payload.request_id)
        self.discard(payload.request_id)  # an earlier attempt's, never received
        with open(path, "xb") as f:
            f.truncate(size)
        buf = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        buf[8:_HEAD] = torch.tensor(list(len(header).to_bytes(8, "little")), dtype=torch.uint8)
        buf[_HEAD:_HEAD + len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        at = _HEAD + len(header)
        for r in raw:  # device -> mapping directly for a GPU pool
            at = _aligned(at)
            buf[at:at + r.numel()].copy_(r)
            at += r.numel()
        buf[0] = 1  # ready: everything above is in place

    def recv(self, request_id: str) -> KVPayload | None:
        path = self._path(request_id)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            return None
        if size < _HEAD:  # being created
            return None
        buf = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
        if int(buf[0]) != 1:  # still being written
            return None
        os.unlink(path)  # the mapping stays valid while the tensors below live
        n = int.from_bytes(bytes(buf[8:_HEAD].tolist()), "little")
        header = msgpack.unpackb(bytes(buf[_HEAD:_HEAD + n].numpy()))
        at, layers = _HEAD + n, []
        for dtype_name, shape in header["layers"]:
            dtype = getattr(torch, dtype_name)
            count = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            at = _aligned(at)
            layers.append(buf[at:at + count].view(dtype).reshape(shape))
            at += count
        hashes = [int.from_bytes(h, "little") for h in header["hashes"]]
        return KVPayload(request_id, hashes, layers)

    def discard(self, request_id: str) -> None:
        """Drop a payload nobody will receive (its request ended), if it is there."""
        try:
            os.unlink(self._path(request_id))
        except FileNotFoundError:
            pass
