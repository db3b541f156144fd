"""The messages between `MultiProcExecutor` (the engine's side) and its workers.

One ZeroMQ ROUTER socket on the engine's side, one DEALER per worker; every message is one
of these dataclasses, msgpack-encoded (executor/codec.py). A worker's life:

    worker                                  engine (MultiProcExecutor)
    WorkerHello(rank)            ------>
                                 <------    WorkerInit(config): the EngineConfig, as a dict
    (join torch.distributed, load this rank's shard)
    WorkerReady(rank, blocks)    ------>    num_blocks = min over ranks
                                 <------    InitKVCache(num_blocks)
    KVCacheReady(rank)           ------>
    loop:                        <------    LaunchStep(plan)    (to every rank, in order)
                                 <------    CollectStep()
    StepDone(rank, result)       ------>    (rank 0's result; the others send None)
    or WorkerFailed(rank, error, fatal)
                                 <------    Shutdown()

A step that raises on every rank alike (a bad request) is a WorkerFailed with
fatal=False: the engine isolates it as it would in-process. A rank that dies, fails alone
or cannot start is fatal: the engine fails every live request and stops.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tandem.config import ENGINE_CONFIGS, EngineConfig
from tandem.executor.codec import register
from tandem.outputs import StepPlan, StepResult


@register
@dataclass(frozen=True, slots=True)
class WorkerHello:
    rank: int
    pid: int


@register
@dataclass(frozen=True, slots=True)
class WorkerInit:
    config: dict[str, Any]  # EngineConfig as nested dicts (config_to_dict)


@register
@dataclass(frozen=True, slots=True)
class WorkerReady:
    rank: int
    device: str  # where the rank runs, e.g. cuda:1
    dtype: str
    num_blocks: int  # KV blocks that fit on this rank
    block_bytes: int  # bytes per KV block on this rank


@register
@dataclass(frozen=True, slots=True)
class InitKVCache:
    num_blocks: int  # the pool every rank allocates (the minimum over ranks)


@register
@dataclass(frozen=True, slots=True)
class KVCacheReady:
    rank: int
    spec_costs: dict | None = None  # ModelRunner.profile_spec_costs() (speculation only)


@register
@dataclass(frozen=True, slots=True)
class LaunchStep:
    plan: StepPlan


@register
@dataclass(frozen=True, slots=True)
class CollectStep:
    pass


@register
@dataclass(frozen=True, slots=True)
class StepDone:
    rank: int
    result: StepResult | None  # rank 0's; None from the other ranks


@register
@dataclass(frozen=True, slots=True)
class WorkerFailed:
    rank: int
    error: str
    fatal: bool  # the rank cannot go on (start-up failed, a node lost a worker)


@register
@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


def config_to_dict(config: EngineConfig) -> dict[str, Any]:
    return {f.name: dataclasses.asdict(getattr(config, f.name))
            for f in dataclasses.fields(config)}


def config_from_dict(data: dict[str, Any]) -> EngineConfig:
    names = [f.name for f in dataclasses.fields(EngineConfig)]
    return EngineConfig(*(cls(**data[name]) for name, cls in zip(names, ENGINE_CONFIGS)))
