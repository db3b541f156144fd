"""Weights read into L2 while the layer waits on latency-bound kernels (batch-1 decode).

    side = prefetch.start(self.o_proj, hidden)    # fork: a side stream reads o_proj's
    ... rotary + K/V write, decode attention ...  #   weights into L2 meanwhile
    prefetch.join(side)                           # o_proj waits for the side stream
    out = self.o_proj(attn)                       #   and reads its weights from L2

Forked after the qkv GEMV, so the prefetch does not compete with a bandwidth-bound kernel.
Works eagerly and under CUDA-graph capture (the fork and join become graph edges). Only for
steps of at most MAX_ROWS tokens on a Hopper GPU, when `TANDEM_WEIGHT_PREFETCH=1`
(kernels/triton/l2_prefetch.py; measurements in docs/decode.md).
"""

from __future__ import annotations

import torch
from torch import nn

from tandem import envs

try:
    from tandem.kernels.triton import l2_prefetch
except ImportError:  # no triton
    l2_prefetch = None

MAX_ROWS = 4
MIN_BYTES = 1 << 20  # smaller tensors (biases, scales) are not worth a launch
_SIDE: dict[torch.device, torch.cuda.Stream] = {}


def start(module: nn.Module, x: torch.Tensor) -> torch.cuda.Stream | None:
    """Fork a side stream from x's current stream that prefetches module's large tensors;
    None when it does not apply."""
    if (l2_prefetch is None or not x.is_cuda or x.shape[0] > MAX_ROWS
            or not envs.weight_prefetch_enabled()):
        return None
    tensors = [t for t in module.parameters() if t.numel() * t.element_size() >= MIN_BYTES
               and l2_prefetch.supported(t)]
    if not tensors:
        return None
    main = torch.cuda.current_stream(x.device)
    side = _SIDE.get(x.device)
    if side is None:
        side = _SIDE[x.device] = torch.cuda.Stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for t in tensors:
            l2_prefetch.l2_prefetch(t)
    return side


def join(side: torch.cuda.Stream | None) -> None:
    """The current stream waits for the side stream's prefetches (no-op for None)."""
    if side is not None:
        torch.cuda.current_stream(side.device).wait_stream(side)
