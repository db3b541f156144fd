"""RMSNorm, with the residual add fused in (the decoder layer's pre-norm pattern)."""

from __future__ import annotations

import torch
from torch import nn

from tandem.kernels import ops
from tandem.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back (as HF does).

    forward(x) -> y; forward(x, residual) -> (norm(x + residual), x + residual), the add in
    the input dtype so the residual stream rounds exactly like the HF reference.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
