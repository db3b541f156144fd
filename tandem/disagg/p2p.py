"""KV over point-to-point sends (`--kv-connector nccl`): the workers on different GPUs of
one node join one torch.distributed group (NCCL on CUDA, so the blocks ride NVLink; gloo
on a CPU, for tests), rank = the worker's index in the front end's list.

    prefill worker                                  decode worker
    gather the blocks -> one (layers, 2, n, ...)    KVReady(header) arrives via the front
    tensor; isend(dst); Shipped(header) -------->   end, in the order they were sent; recv
    keep the tensor until the send completes        into a fresh tensor at once (even for a
                                                    request that ended: sends and receives
                                                    between two ranks must pair up in order)

The header (pickled: source rank, shape, dtype, hashes) travels with the control
messages; the bytes go device to device. A receive whose request has ended is dropped
after it completes.

Limits: a worker that dies with a send or receive posted leaves its peer's NCCL call
waiting until the watchdog ends that process too; shared memory and CUDA IPC have no such
coupling.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tandem.disagg.connector import KVPayload

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class P2PGroup:
    """Where the workers meet (given by the front end)."""
    init_method: str  # tcp://host:port
    rank: int
    world_size: int


class P2PLink:
    def __init__(self, group: P2PGroup, device: torch.device) -> None:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            if device.index is None:  # "cuda": this worker's one visible GPU
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=group.init_method, rank=group.rank,
                                world_size=group.world_size)
        self.rank, self.device = group.rank, device
        self._sending: list[tuple[dist.Work, torch.Tensor]] = []  # until each completes
        logger.info("joined the KV transfer group as rank %d of %d (%s)", group.rank,
                    group.world_size, backend)

    def send(self, payload: KVPayload, dst: int) -> bytes:
        """Post the payload's send to rank `dst`; the header for the receiver."""
        flat = torch.stack(payload.layers).contiguous()  # (layers, 2, n, block, heads, dim)
        self._sending.append((dist.isend(flat, dst), flat))
        self.reap()
        return pickle.dumps((self.rank, tuple(flat.shape), str(flat.dtype), payload.hashes))

    def reap(self) -> None:
        """Release the tensors of completed sends."""
        self._sending = [(w, t) for w, t in self._sending if not w.is_completed()]

    def recv(self, request_id: str, header: bytes) -> KVPayload:
        """Receive what `send`'s header announces (call in the order they were sent)."""
        src, shape, dtype_name, hashes = pickle.loads(header)
        buf = torch.empty(shape, dtype=getattr(torch, dtype_name.removeprefix("torch.")),
                          device=self.device)
        dist.recv(buf, src)  # CUDA: ordered on the current stream before what reads buf
        return KVPayload(request_id, list(hashes), list(buf.unbind(0)))

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

