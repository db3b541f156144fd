"""`MultiProcExecutor`: one worker process per tensor-parallel rank, driven over ZeroMQ.

    engine process (driver)                     worker processes (executor/worker.py)
    ROUTER socket --LaunchStep(plan)-->  rank 0 DEALER: ModelRunner (cuda:0)  <- NCCL / gloo ->
                  --CollectStep------->  rank 1 DEALER: ModelRunner (cuda:1)     all-reduce
                  <--StepDone(result)--  (rank 0's result; the others reply None)

Every message goes to every rank in the same order (msgpack, messages.py); a step's result
comes back once all ranks replied, so the ranks never drift apart. On one node the socket
is an ipc:// path and the driver starts every worker. On several (`nnodes`), node 0 binds
tcp://MASTER_ADDR:MASTER_PORT+1 and starts its own ranks; every other node runs
`run_node` (`tandem serve ... --node-rank N`), which starts that node's ranks, watches
them and reports a death to the driver. torch.distributed rendezvous at MASTER_PORT.

Failure handling: the driver polls its socket in short slices and checks its workers in
between, so a worker that dies (or a node that reports one) raises `ExecutorDead` within
a second instead of leaving the engine waiting on a reply that never comes.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import zmq

from tandem import envs
from tandem.config import EngineConfig
from tandem.executor import codec
from tandem.executor.base import Executor, ExecutorDead, StepFailed
from tandem.executor.messages import (CollectStep, InitKVCache, KVCacheReady, LaunchStep,
                                      Shutdown, StepDone, WorkerFailed, WorkerHello,
                                      WorkerInit, WorkerReady, config_to_dict)
from tandem.outputs import StepPlan, StepResult

logger = logging.getLogger(__name__)
_START_TIMEOUT_S = 1800.0  # model load + KV sizing + CUDA graph capture, on every rank
_DIVERGED_TIMEOUT_S = 30.0  # after one rank failed a step, how long the others may take


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(config: EngineConfig, driver: str, master_port: int) -> list[subprocess.Popen]:
    """This node's worker processes, with torchrun's environment."""
    p = config.parallel
    first = p.node_rank * p.ranks_per_node
    procs = []
    for local_rank in range(p.ranks_per_node):
        env = {**os.environ, **envs.NO_NVLINK_MULTICAST, "MASTER_ADDR": p.master_addr,
               "MASTER_PORT": str(master_port), "WORLD_SIZE": str(p.tensor_parallel_size),
               "RANK": str(first + local_rank), "LOCAL_RANK": str(local_rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tandem.executor.worker", driver],
                                      env=env))
    return procs


def _master_port(config: EngineConfig) -> int:
    return config.parallel.master_port or free_port()


class MultiProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        p = config.parallel
        self.world_size = p.tensor_parallel_size
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a lost worker raises
        master_port = _master_port(config)
        if p.nnodes == 1:
            self._ipc_dir = tempfile.mkdtemp(prefix="tandem-")
            address = f"ipc://{self._ipc_dir}/executor-{uuid.uuid4().hex[:8]}"
            self.sock.bind(address)
        else:
            self._ipc_dir = None
            self.sock.bind(f"tcp://*:{master_port + 1}")
            address = f"tcp://{p.master_addr}:{master_port + 1}"
        self.procs = spawn_workers(config, address, master_port)
        self._closed = False
        atexit.register(self.shutdown)  # an LLM left open at exit still stops its workers
        try:
            self._start(config)
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up --------------------------------------------------------------------------
    def _start(self, config: EngineConfig) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        hellos = self._gather(WorkerHello, deadline, "start")
        logger.info("tensor-parallel workers up: %s",
                    ", ".join(f"rank {r} pid {h.pid}" for r, h in sorted(hellos.items())))
        self._broadcast(WorkerInit(config_to_dict(config)))
        ready = self._gather(WorkerReady, deadline, "load the model")
        r0 = ready[0]
        import torch
        self.device, self.dtype = torch.device(r0.device), getattr(torch, r0.dtype)
        self.block_bytes = r0.block_bytes
        self.num_blocks = min(r.num_blocks for r in ready.values())
        logger.info("KV blocks per rank: %s; the pool takes the minimum, %d",
                    [ready[r].num_blocks for r in sorted(ready)], self.num_blocks)
        self._broadcast(InitKVCache(self.num_blocks))
        ready = self._gather(KVCacheReady, deadline, "allocate the KV cache")
        self.spec_costs = ready[0].spec_costs or {}

    # ---- steps -----------------------------------------------------------------------------
    def launch(self, plan: StepPlan) -> StepPlan:
        self._broadcast(LaunchStep(plan))
        return plan

    def collect(self, handle: StepPlan) -> StepResult:
        self._broadcast(CollectStep())
        done = self._gather(StepDone, None, "run a step")
        return done[0].result

    # ---- transport -------------------------------------------------------------------------
    def _broadcast(self, message: object) -> None:
        data = codec.encode(message)
        try:
            for rank in range(self.world_size):
                self.sock.send_multipart([f"rank{rank}".encode(), data])
        except zmq.ZMQError as e:
            raise ExecutorDead(f"a tensor-parallel worker is unreachable: {e}") from e

    def _gather(self, kind: type, deadline: float | None, what: str) -> dict[int, object]:
        """One `kind` reply from every rank. Raises StepFailed if every rank failed the step
        alike, ExecutorDead if a worker died, failed alone or missed the deadline."""
        replies: dict[int, object] = {}
        failures: dict[int, WorkerFailed] = {}
        first_failure = 0.0
        while len(replies) + len(failures) < self.world_size:
            if self.sock.poll(200):
                _, data = self.sock.recv_multipart()
                message = codec.decode(data)
                if isinstance(message, WorkerFailed):
                    if message.fatal:
                        raise ExecutorDead(message.error)
                    failures[message.rank] = message
                    first_failure = first_failure or time.monotonic()
                elif isinstance(message, kind):
                    replies[message.rank] = message
                else:
                    raise ExecutorDead(f"unexpected message from a worker: {message!r}")
                continue
            self._check_workers()
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise ExecutorDead(f"the tensor-parallel workers did not {what} in time")
            if first_failure and now - first_failure > _DIVERGED_TIMEOUT_S:
                raise ExecutorDead(f"rank(s) {sorted(failures)} failed a step the others did "
                                   f"not finish: {next(iter(failures.values())).error}")
        if failures and replies:
            raise ExecutorDead(f"the ranks diverged: rank(s) {sorted(failures)} failed a step "
                               f"the others ran: {next(iter(failures.values())).error}")
        if failures:
            raise StepFailed(failures[min(failures)].error)
        return replies

    def _check_workers(self) -> None:
        for proc in self.procs:
            code = proc.poll()
            if code is not None:
                raise ExecutorDead(f"tensor-parallel worker pid {proc.pid} exited "
                                   f"with code {code}")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        try:
            self._broadcast(Shutdown())
        except ExecutorDead:
            pass
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.sock.close()
        self.ctx.term()
        if self._ipc_dir is not None:
            for name in os.listdir(self._ipc_dir):
                os.unlink(os.path.join(self._ipc_dir, name))
            os.rmdir(self._ipc_dir)


def run_node(config: EngineConfig) -> int:
    """Node `node_rank` > 0 of a multi-node run: start this node's ranks, report a death to
    the driver, and exit when they do (non-zero if any failed)."""
    p = config.parallel
    address = f"tcp://{p.master_addr}:{p.master_port + 1}"
    procs = spawn_workers(config, address, p.master_port)
    logger.info("node %d: ranks %s started, driver %s", p.node_rank,
                [p.node_rank * p.ranks_per_node + i for i in range(len(procs))], address)
    code = 0
    while procs:
        for proc in list(procs):
            rc = proc.poll()
            if rc is None:
                continue
            procs.remove(proc)
            if rc != 0 and code == 0:
                code = rc
                _report_death(address, p.node_rank, f"node {p.node_rank}: worker pid "
                              f"{proc.pid} exited with code {rc}")
                for other in procs:
                    other.kill()
        time.sleep(0.2)
    return code


def _report_death(address: str, node_rank: int, error: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, f"node{node_rank}".encode())
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(address)
    sock.send(codec.encode(WorkerFailed(-1, error, True)))
    sock.close()
    ctx.term()
