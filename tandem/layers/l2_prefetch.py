"""Which weights a layer asks the GPU to read into L2 ahead of use (batch-1 decode).

`weight_of(o_proj, num_tokens, device)` is o_proj's largest tensor (its weight, or a
quantized method's packed weight) when the step has at most MAX_ROWS tokens on a Hopper
GPU and `TANDEM_WEIGHT_PREFETCH` is not "0"; else None. The attention layer hands it to
the backend's forward (`prefetch=`), whose decode launch warms L2 with it
(kernels/triton/l2_prefetch.py). Results never depend on it.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem import envs

try:
    from tandem.kernels.triton import l2_prefetch as kernel
except ImportError:  # no triton
    kernel = None

MAX_ROWS = 4  # larger decode batches keep HBM busy in attention themselves


def weight_of(module: nn.Module, num_tokens: int, device: torch.device) -> torch.Tensor | None:
    if (kernel is None or device.type != "cuda" or num_tokens > MAX_ROWS
            or not envs.weight_prefetch_enabled()):
        return None
    largest = max(module.parameters(), key=lambda t: t.numel() * t.element_size(), default=None)
    return largest if largest is not None and kernel.supported(largest) else None
