"""`CustomAllReduce`: a one-shot all-reduce for small CUDA messages on 2..8 GPUs of one
host, over CUDA IPC buffers and NVLink, for the decode steps of tensor parallelism.

A decode step all-reduces a (batch, hidden) tensor after every row-parallel layer; for
such messages NCCL costs ~100 us where one read of each peer's buffer costs a few. This
file owns the buffers and the host side; the kernel (and its memory-ordering argument) is
`tandem.kernels.triton.all_reduce`, its spec `tandem.kernels.reference.all_reduce`.

Setup, every step a collective over the caller's CPU (gloo) group, so all ranks agree:

    1. gather (host, GPU uuid, SMs, local reason)   any reason -> disabled on every rank
    2. allocate my IPC buffer (flags zeroed), gather its handle
       (torch.multiprocessing.reductions.reduce_tensor), plus any peer-access problem
    3. open every peer's buffer (CUDA IPC), gather the outcome; any failure -> disabled

Per call (`all_reduce`): one Triton launch on the current stream, no host sync and no
allocation but the output, so it can be captured in a CUDA graph (setup compiles the
usual variants; a size that is not a multiple of 16 elements compiles on first use, so
run it once eagerly before capturing it). Every rank must make the same calls
(shapes, dtypes, order) on one stream, as with any collective. Never uses NVLink
multicast (NVLS / symmetric-memory multicast): plain peer loads and stores only.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def join_cuda_group(rank: int, world: int, port: int, max_bytes: int
                    ) -> tuple[torch.device, CustomAllReduce]:
    """A spawned rank of a loopback test or benchmark: GPU `rank`, an NCCL group, a gloo
    group and a CustomAllReduce on it. Sets NVLink multicast off first."""
    from tandem.envs import NO_NVLINK_MULTICAST
    os.environ.update(NO_NVLINK_MULTICAST)  # before CUDA and torch.distributed initialize
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=device)
    return device, CustomAllReduce(dist.new_group(backend="gloo"), rank, world, device,
                                   max_bytes=max_bytes)
_MAX_WORLD = 8  # the kernel's flag table has 8 columns
_ALIGN = 256  # bytes: buffer bases, deltas and sizes are multiples of it (kernel's hint)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _triton_kernel():
    """The launcher, or None where triton does not import (CPU-only installs)."""
    try:
        from tandem.kernels.triton import all_reduce
    except ImportError:
        return None
    return all_reduce


def _uuid(index: int) -> str:
    return str(getattr(torch.cuda.get_device_properties(index), "uuid", index))


class CustomAllReduce:
    """Out-of-place sum over the group for small CUDA tensors; `should_use` says when.

    cpu_group: a gloo group of the same ranks (setup and close only). rank, world_size:
    this rank's place in it. device: this rank's GPU. max_bytes: the largest message
    (two data buffers of this size are allocated per rank). max_programs: the most
    programs (thread blocks) one call launches. Construct and `close` on every rank.
    """

    def __init__(self, cpu_group: Any, rank: int, world_size: int, device: torch.device,
                 max_bytes: int = 8 * 2**20, max_programs: int = 64) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world_size, self.device = rank, world_size, device
        self.max_bytes = max_bytes
        self.disabled_reason: str | None = None
        self._group = cpu_group
        self._buffer: torch.Tensor | None = None  # my IPC buffer (uint8), see kernel docs
        self._peers: list[torch.Tensor] = []  # peers' buffers, opened here (kept alive)
        # dtype -> (my data buffer 0 as dtype, (world,) element deltas to each rank's, and
        # elements from buffer 0 to buffer 1): the kernel's arguments for that dtype
        self._views: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._flags: torch.Tensor | None = None  # my flags, (max_programs * 8,) int64
        self._flag_deltas: torch.Tensor | None = None  # (world,) int64 element deltas
        self._epochs: torch.Tensor | None = None  # (max_programs,) int64 call counters
        reason = self.unavailable_reason(world_size, device)
        if not 2 <= world_size <= _MAX_WORLD:  # the same on every rank: no need to agree
            self._disable(reason)
            return
        self._setup(reason, max_programs)

    @staticmethod
    def unavailable_reason(world_size: int, device: torch.device) -> str | None:
        """Why this rank alone cannot take part (None: it can); peers are checked later."""
        if not 2 <= world_size <= _MAX_WORLD:
            return f"world size {world_size} is outside 2..{_MAX_WORLD}"
        if torch.device(device).type != "cuda" or not torch.cuda.is_available():
            return f"device {device} is not CUDA"
        if _triton_kernel() is None:
            return "triton is not installed"
        return None

    @classmethod
    def is_available(cls, world_size: int, device: torch.device) -> bool:
        return cls.unavailable_reason(world_size, device) is None

    @property
    def enabled(self) -> bool:
        return self._buffer is not None

    def should_use(self, x: torch.Tensor) -> bool:
        """True for a contiguous bf16/fp16/fp32 tensor on this rank's GPU of at most
        max_bytes, when the all-reduce is set up."""
        return (self._buffer is not None and x.is_cuda and x.device == self.device
                and x.dtype in _DTYPES and x.is_contiguous()
                and x.numel() * x.element_size() <= self.max_bytes)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (same shape and dtype), summed in rank order in
        float32, bitwise the same on every rank. Requires should_use(x)."""
        assert self.should_use(x), "CustomAllReduce.all_reduce: check should_use(x) first"
        out = torch.empty_like(x)
        if x.numel() == 0:
            return out
        data, data_deltas, buf_elems = self._views[x.dtype]
        args = (x, out, data, data_deltas, self._flags, self._flag_deltas, self._epochs,
                buf_elems, self.rank, self._max_programs)
        if torch.cuda.current_device() == self.device.index:
            self._kernel.one_shot_all_reduce(*args)
        else:  # Triton launches on the current device's stream
            with torch.cuda.device(self.device):
                self._kernel.one_shot_all_reduce(*args)
        return out

    def close(self) -> None:
        """Unmap the peers' buffers, then free mine (collective: every rank calls it)."""
        if self._buffer is None:
            return
        torch.cuda.synchronize(self.device)  # no kernel still reads a peer's buffer
        self._peers.clear()
        dist.barrier(group=self._group)  # every rank unmapped my buffer before I free it
        self._release()
        self.disabled_reason = "closed"

    # -- setup -----------------------------------------------------------------------

    def _release(self) -> None:
        """Drop every reference to the peers' buffers and to mine (views included)."""
        self._peers.clear()
        self._views.clear()
        self._buffer = self._flags = self._flag_deltas = self._epochs = None

    def _disable(self, reason: str | None) -> None:
        self.disabled_reason = reason or "unknown"
        self._release()
        if self.rank == 0:  # the reason is agreed: one line per group
            log = logger.info if self.world_size == 1 else logger.warning
            log("custom all-reduce disabled: %s", self.disabled_reason)

    def _agree(self, reason: str | None, payload: Any) -> list[Any] | None:
        """Gather (reason, payload) from every rank: the payloads, or None (and disabled
        on every rank) if any rank gave a reason."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (reason, payload), group=self._group)
        reasons = [f"rank {r}: {why}" for r, (why, _) in enumerate(gathered) if why]
        if reasons:
            self._disable("; ".join(reasons))
            return None
        return [p for _, p in gathered]

    def _setup(self, reason: str | None, max_programs: int) -> None:
        mine = None
        if reason is None:
            props = torch.cuda.get_device_properties(self.device)
            mine = (socket.gethostname(), _uuid(self.device.index), props.multi_processor_count)
        infos = self._agree(reason, mine)
        if infos is None:
            return
        # Same grid on every rank, no more programs than SMs (all co-resident: a program
        # spins on its peers' same-index program).
        self._max_programs = min([max_programs] + [sms for _, _, sms in infos])
        reason, handle = self._peer_access_reason(infos), None
        if reason is None:
            try:
                handle = self._allocate()
            except Exception as e:  # e.g. CUDA IPC unsupported by the allocator setup
                reason = f"could not share an IPC buffer: {e}"
        handles = self._agree(reason, handle)
        if handles is None:
            return
        try:
            self._open(handles)
            reason = None
        except Exception as e:
            reason = f"could not open the peers' IPC buffers: {e}"
        if self._agree(reason, None) is None:
            return
        # Compile and load the usual variants (sizes a multiple of 16) now rather than in
        # the first CUDA-graph capture: collectives like any call, the same on every rank.
        for dtype in _DTYPES:
            self.all_reduce(torch.zeros(4096, dtype=dtype, device=self.device))
        torch.cuda.synchronize(self.device)
        logger.info("custom all-reduce on rank %d: %d ranks, up to %d bytes, %d programs",
                    self.rank, self.world_size, self.max_bytes, self._max_programs)

    def _peer_access_reason(self, infos: list[tuple[str, str, int]]) -> str | None:
        if len({host for host, _, _ in infos}) != 1:
            return "ranks are on different hosts"
        local = {_uuid(i): i for i in range(torch.cuda.device_count())}
        for r, (_, uuid, _) in enumerate(infos):
            if r == self.rank:
                continue
            if uuid not in local:
                return f"rank {r}'s GPU is not visible here (CUDA_VISIBLE_DEVICES)"
            if not torch.cuda.can_device_access_peer(self.device.index, local[uuid]):
                return f"no peer access from cuda:{self.device.index} to rank {r}'s GPU"
        return None

    def _allocate(self) -> tuple[Any, tuple]:
        """My buffer, | flags | data 0 | data 1 |, flags zeroed; its picklable handle."""
        from torch.multiprocessing.reductions import reduce_tensor

        kernel = _triton_kernel()
        self._kernel = kernel
        self._flag_bytes = _round_up(self._max_programs * kernel.MAX_RANKS * 8, _ALIGN)
        self._data_bytes = _round_up(self.max_bytes, _ALIGN)
        total = self._flag_bytes + 2 * self._data_bytes
        self._buffer = torch.zeros(total, dtype=torch.uint8, device=self.device)
        self._epochs = torch.zeros(self._max_programs, dtype=torch.int64, device=self.device)
        torch.cuda.synchronize(self.device)  # zeroed before any peer can signal into it
        return reduce_tensor(self._buffer)

    def _open(self, handles: list[tuple[Any, tuple]]) -> None:
        """Map every peer's buffer into this process and build the kernel's tables."""
        bases = []
        for r, (rebuild, args) in enumerate(handles):
            if r == self.rank:
                bases.append(self._buffer.data_ptr())
                continue
            # args[6] is the owner's device index. Open the handle on MY device instead:
            # cudaIpcOpenMemHandle maps into the current device and enables peer access
            # from it, which is what this rank's kernels need (and no context is made
            # on the peer's GPU in this process).
            args = list(args)
            assert isinstance(args[6], int), "unexpected reduce_tensor layout"
            args[6] = self.device.index
            peer = rebuild(*args)
            self._peers.append(peer)
            bases.append(peer.data_ptr())
        torch.cuda.synchronize(self.device)
        if any(b % _ALIGN for b in bases):
            raise RuntimeError(f"IPC buffers not {_ALIGN}-byte aligned: {bases}")
        deltas = [b - bases[self.rank] for b in bases]  # bytes from my buffer to rank r's
        self._flags = self._buffer[:self._flag_bytes].view(torch.int64)
        self._flag_deltas = self._int64([d // 8 for d in deltas])
        for dtype in _DTYPES:
            size = torch.empty((), dtype=dtype).element_size()
            data = self._buffer[self._flag_bytes:].view(dtype)  # both data buffers
            self._views[dtype] = (data, self._int64([d // size for d in deltas]),
                                  self._data_bytes // size)

    def _int64(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)
