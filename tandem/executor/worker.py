"""The worker process: one tensor-parallel rank.

    python -m tandem.executor.worker DRIVER_ADDRESS

Its place comes from torch.distributed's standard environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT: what torchrun sets), its engine config from the
driver (messages.py). It joins the process group (NCCL on CUDA, gloo on CPU), loads its
shard of the model into a `ModelRunner`, and then applies the driver's messages in order:
every rank runs every plan, so their collectives line up. It exits when told to, when
the driver's socket goes quiet and its parent is gone, or on a start-up failure.
"""

from __future__ import annotations

import collections
import logging
import os
import sys

import torch
import zmq

from tandem import envs
from tandem.executor import codec
from tandem.executor.messages import (CollectStep, InitKVCache, KVCacheReady, LaunchStep,
                                      Shutdown, StepDone, WorkerFailed, WorkerHello,
                                      WorkerInit, WorkerReady, config_from_dict)

logger = logging.getLogger("tandem.worker")


class Worker:
    def __init__(self, driver: str, rank: int, local_rank: int, world_size: int) -> None:
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.parent = os.getppid()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, f"rank{rank}".encode())
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.connect(driver)
        self.runner = None

    def send(self, message: object) -> None:
        self.sock.send(codec.encode(message))

    def recv(self) -> object:
        """The driver's next message; exits if the parent (engine or node launcher) is gone."""
        while not self.sock.poll(1000):
            if os.getppid() != self.parent:
                logger.error("rank %d: the parent process is gone; exiting", self.rank)
                sys.exit(1)
        return codec.decode(self.sock.recv())

    def run(self) -> int:
        self.send(WorkerHello(self.rank, os.getpid()))
        init = self.recv()
        assert isinstance(init, WorkerInit), init
        try:
            self._start(config_from_dict(init.config))
        except Exception as e:
            logger.exception("rank %d failed to start", self.rank)
            self.send(WorkerFailed(self.rank, f"rank {self.rank} failed to start: {e}", True))
            return 1
        pending: collections.deque = collections.deque()  # launched steps, or their errors
        while True:
            message = self.recv()
            if isinstance(message, LaunchStep):
                try:
                    pending.append(self.runner.launch(message.plan))
                except Exception as e:
                    logger.exception("rank %d: step failed", self.rank)
                    pending.append(e)
            elif isinstance(message, CollectStep):
                self._collect(pending.popleft())
            elif isinstance(message, InitKVCache):
                self.runner.init_kv_cache(message.num_blocks)
                self.send(KVCacheReady(self.rank, self.runner.profile_spec_costs()))
            elif isinstance(message, Shutdown):
                return 0
            else:
                raise RuntimeError(f"rank {self.rank}: unexpected message {message!r}")

    def _collect(self, launched: object) -> None:
        if isinstance(launched, Exception):
            self.send(WorkerFailed(self.rank, f"{type(launched).__name__}: {launched}", False))
            return
        try:
            result = self.runner.collect(launched)
        except Exception as e:
            logger.exception("rank %d: step failed", self.rank)
            self.send(WorkerFailed(self.rank, f"{type(e).__name__}: {e}", False))
            return
        self.send(StepDone(self.rank, result if self.rank == 0 else None))

    def _start(self, config) -> None:
        import torch.distributed as dist

        from tandem.distributed.parallel import ParallelContext
        from tandem.runner.model_runner import ModelRunner, resolve_device

        device = resolve_device(config.model.device)
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        else:  # share the cores among this node's ranks
            per_node = config.parallel.ranks_per_node
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method="env://", world_size=self.world_size,
                                rank=self.rank, device_id=device if backend == "nccl" else None)
        custom = None
        if device.type == "cuda" and self.world_size > 1:
            custom = _custom_all_reduce(self.rank, self.world_size, device)
        parallel = ParallelContext(self.rank, self.world_size, dist.group.WORLD, custom,
                                   config.parallel.enable_expert_parallel,
                                   config.parallel.expert_dispatch)
        self.runner = ModelRunner(config, parallel, device)
        self.send(WorkerReady(self.rank, str(device), str(self.runner.dtype).split(".")[-1],
                              self.runner.available_kv_blocks(), self.runner.block_bytes))


def _custom_all_reduce(rank: int, world_size: int, device: torch.device):
    """The IPC all-reduce for small messages, or None (NCCL for everything) if unusable."""
    import torch.distributed as dist
    try:
        from tandem.distributed.custom_all_reduce import CustomAllReduce
        return CustomAllReduce(dist.new_group(backend="gloo"), rank, world_size, device)
    except Exception as e:  # NCCL still works; say why the fast path is off
        logger.warning("rank %d: custom all-reduce unavailable (%s); using NCCL", rank, e)
        return None


def main() -> int:
    os.environ.update(envs.NO_NVLINK_MULTICAST)
    logging.basicConfig(level=os.environ.get("TANDEM_WORKER_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s %(levelname)s %(name)s"
                               f"[rank {os.environ.get('RANK', '?')}]: %(message)s")
    env = os.environ
    worker = Worker(sys.argv[1], int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])),
                    int(env["WORLD_SIZE"]))
    code = worker.run()
    worker.sock.close()
    worker.ctx.term()
    return code


if __name__ == "__main__":
    sys.exit(main())
