"""`Executor`: runs step plans on the model runner(s); the engine never knows which kind.

    UniProcExecutor    the runner in the engine's own process (one rank; tests, CPU, 1 GPU)
    MultiProcExecutor  one worker process per tensor-parallel rank (executor/multiproc.py)

`launch(plan)` starts a step and returns a handle; `collect(handle)` waits for its
`StepResult`. A step that raises (a request the model cannot run) raises `StepFailed` or
the runner's own error, which the engine isolates; `ExecutorDead` means the executor cannot
go on (a worker died or a rank diverged) and the engine fails everything and stops.
"""

from __future__ import annotations

from typing import Any

import torch

from tandem.config import EngineConfig
from tandem.outputs import StepPlan, StepResult


class StepFailed(RuntimeError):
    """A step raised in the workers (all ranks alike); the message is the workers' error."""


class ExecutorDead(RuntimeError):
    """The executor lost a worker or its ranks diverged: nothing more can run."""


class Executor:
    device: torch.device  # where rank 0 computes
    dtype: torch.dtype  # the model's dtype
    num_blocks: int  # KV blocks in the pool (every rank holds this many)
    block_bytes: int  # bytes per KV block on one rank
    runner: Any = None  # the in-process ModelRunner (UniProcExecutor only)
    # rank 0's profiled step costs for speculative decoding ({"verify": {rows: s}, "draft":
    # ...}; empty when speculation is off), read by the engine's switch
    spec_costs: dict = {}

    @staticmethod
    def create(config: EngineConfig) -> Executor:
        """The executor `config.parallel` asks for, its KV cache sized and allocated."""
        backend = config.parallel.executor_backend
        if backend == "uni":
            from tandem.executor.uniproc import UniProcExecutor
            return UniProcExecutor(config)
        from tandem.executor.multiproc import MultiProcExecutor
        return MultiProcExecutor(config)

    def launch(self, plan: StepPlan) -> Any:
        raise NotImplementedError

    def collect(self, handle: Any) -> StepResult:
        raise NotImplementedError

    def execute(self, plan: StepPlan) -> StepResult:
        return self.collect(self.launch(plan))

    def shutdown(self) -> None:
        pass
