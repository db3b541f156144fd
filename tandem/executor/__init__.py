"""Executors: how the engine's step plans reach the model runner(s).

    base.py       Executor (launch, collect), StepFailed, ExecutorDead
    uniproc.py    UniProcExecutor: the runner in-process
    multiproc.py  MultiProcExecutor: one worker process per tensor-parallel rank
    worker.py     the worker process: torch.distributed, a ModelRunner, the step loop
    messages.py   the messages between them; codec.py their msgpack encoding
"""

from tandem.executor.base import Executor, ExecutorDead, StepFailed

__all__ = ["Executor", "ExecutorDead", "StepFailed"]
