"""`ParallelContext`: a rank's place in the tensor-parallel group, and its collectives.

Every parallel layer gets one at construction (`layers/linear.py`, `layers/embedding.py`)
and calls `all_reduce` / `all_gather` on it; nothing global. With one rank both are the
identity, so the single-GPU and CPU paths pay nothing.

    all_reduce   after each row-parallel matmul (o_proj, down_proj) and the vocab-parallel
                 embedding: small on decode, so a custom IPC all-reduce takes messages up
                 to its size limit on CUDA (distributed/custom_all_reduce.py), NCCL the rest
    all_gather   the vocab-parallel logits, whole on every rank (so every rank samples
                 the same tokens: same logits, same seeds, same random streams)

Sums are identical on every rank (NCCL, gloo and the custom kernel all reduce in a fixed
order), which keeps the ranks' sampled tokens equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int  # this rank's index in the tensor-parallel group
    tp_size: int  # ranks in the group (1: no tensor parallelism)
    group: Any = None  # the torch.distributed group of the device collectives (None: one rank)
    custom_all_reduce: Any = None  # a CustomAllReduce for small CUDA messages, if usable
    # MoE layers: each rank owns whole experts (E / tp of them) instead of every expert's
    # slice of the intermediate size (layers/moe.py); attention stays tensor parallel
    expert_parallel: bool = False
    expert_dispatch: str = "allreduce"  # how tokens meet their experts (expert_dispatch.py)

    @staticmethod
    def single() -> ParallelContext:
        return ParallelContext(0, 1)

    def shard(self, size: int, what: str) -> int:
        """size / tp_size, or ValueError naming what cannot be split evenly."""
        if size % self.tp_size:
            raise ValueError(f"{what} ({size}) is not divisible by tensor_parallel_size "
                             f"({self.tp_size})")
        return size // self.tp_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the group (a new tensor or `x` itself, summed in place)."""
        if self.tp_size == 1:
            return x
        car = self.custom_all_reduce
        if car is not None and car.should_use(x):
            return car.all_reduce(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x`, concatenated along `dim` in rank order."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)
