"""Gated activations."""

from __future__ import annotations

import torch
from torch import nn

from tandem.kernels import ops


class SiluAndMul(nn.Module):
    """(..., 2*d) = | gate | up | -> silu(gate) * up, (..., d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)
