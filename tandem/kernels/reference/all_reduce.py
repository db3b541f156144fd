"""The all-reduce sum, in plain PyTorch: the spec of the custom IPC all-reduce
(`tandem.kernels.triton.all_reduce`, driven by `tandem.distributed.custom_all_reduce`).

Given every rank's tensor, the sum is taken in rank order (0, 1, 2, ...) in float32 and
cast back once at the end. Rank order is part of the contract, not a detail: float addition
is not associative, and every rank must get the bitwise-same sum so that the ranks of a
tensor-parallel group sample the same tokens.
"""

from __future__ import annotations

import torch


def all_reduce_reference(tensors: list[torch.Tensor]) -> torch.Tensor:
    """tensors[r]: rank r's input, all the same shape and dtype -> their sum, same shape
    and dtype: ((t0 + t1) + t2) + ... in float32, rounded to the dtype once."""
    if not tensors:
        raise ValueError("all_reduce_reference needs at least one tensor")
    first = tensors[0]
    for r, t in enumerate(tensors):
        if t.shape != first.shape or t.dtype != first.dtype:
            raise ValueError(f"rank {r}: {tuple(t.shape)} {t.dtype} != "
                             f"{tuple(first.shape)} {first.dtype} of rank 0")
    # A fresh float32 accumulator: `.float()` of a float32 tensor would alias rank 0's input.
    acc = first.to(torch.float32, copy=True)
    for t in tensors[1:]:
        acc += t.to(device=acc.device, dtype=torch.float32)
    return acc.to(first.dtype)
