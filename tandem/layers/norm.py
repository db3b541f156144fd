"""RMSNorm, with the residual add fused in (the decoder layer's pre-norm pattern)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tandem.kernels import ops
from tandem.layers.linear import default_weight_loader


@dataclass(frozen=True, slots=True)
class PartialSums:
    """A layer output left as S terms a row, `terms` (T, S, H): its value is their sum over
    S (float32, rounded once to the dtype). A mixture-of-experts layer returns its K
    weighted expert outputs this way, and the next RMSNorm's residual add sums them, one
    launch fewer a layer than a separate reduction (kernels/triton/elementwise.py)."""
    terms: torch.Tensor

    def sum(self) -> torch.Tensor:
        return self.terms.sum(1)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast back (as HF does).

    forward(x) -> y; forward(x, residual) -> (norm(x + residual), x + residual), the add in
    the input dtype so the residual stream rounds exactly like the HF reference. x may be
    PartialSums (a MoE layer's output), summed first.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor | PartialSums, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if isinstance(x, PartialSums):
            if residual is None:
                return ops.rms_norm(x.sum(), self.weight, self.eps)
            return ops.sum_add_rms_norm(x.terms, residual, self.weight, self.eps)
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
