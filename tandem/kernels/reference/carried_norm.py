"""An RMSNorm carried by the two matmuls around it, at batch-1 decode: the spec of the GEMVs'
`add` epilogue and `NormedRow` input (kernels/triton/gemv.py, quant_gemm.py), which
models/norm_chain.py chains so that a Llama layer launches no norm kernel:

    producer (o_proj, down_proj)   y = round(x W^T (+ b));  s = round(y + residual)  (the
                                   new residual);  xn = round(s * w_norm);  sumsq = sum s^2
    consumer (qkv, gate_up)        y = round((xn W^T) * rsqrt(sumsq / K + eps) (+ b)), the
                                   product and the scale in float32

The Triton producer leaves sumsq as partial sums, one per program, which the consumer adds
up; here it is one value. The plain path computes W rmsnorm(s) with rmsnorm(s) =
round(round(s * r) * w_norm), r = rsqrt(mean(s^2) + eps) (as HF rounds), so the two agree to
the dtype's rounding (one rounding of s * w_norm before the matmul instead of two), not bit
for bit. The residual stream s rounds exactly as the plain path's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class NormedRow:
    """rmsnorm(s) for one row, its scale not yet applied: value = x * rsqrt(sum(sumsq) / K
    + eps). x (1, K) in the model dtype = round(s * w_norm); sumsq (P,) float32, partial sums
    of s^2 over the row."""
    x: torch.Tensor
    sumsq: torch.Tensor
    eps: float

    def scale(self) -> torch.Tensor:
        """rsqrt(mean(s^2) + eps), float32 (a 0-d tensor)."""
        return torch.rsqrt(self.sumsq.sum() / self.x.shape[-1] + self.eps)


@dataclass(frozen=True, slots=True)
class AddNorm:
    """What a producer's epilogue needs: the residual stream to add its output to, and the
    weight and eps of the RMSNorm that follows."""
    residual: torch.Tensor
    weight: torch.Tensor
    eps: float


def add_norm(y: torch.Tensor, add: AddNorm) -> tuple[NormedRow, torch.Tensor]:
    """A producer's epilogue on its rounded output y: (the next norm's NormedRow, s)."""
    s = y + add.residual
    s32 = s.float()
    xn = (s32 * add.weight.float()).to(s.dtype)
    return NormedRow(xn, s32.pow(2).sum(-1).reshape(1), add.eps), s


def linear(x: torch.Tensor | NormedRow, weight: torch.Tensor, bias: torch.Tensor | None,
           dtype: torch.dtype, add: AddNorm | None = None
           ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
    """x W^T (+ b) with either end carried: x a NormedRow (the consumer), `add` (the
    producer: returns (NormedRow, s)). weight: dense (a quantized method's dequantized
    weight), any float dtype; the product is float32, rounded to `dtype` once."""
    xin = x.x if isinstance(x, NormedRow) else x
    y = F.linear(xin.float(), weight.float())
    if isinstance(x, NormedRow):
        y = y * x.scale()
    if bias is not None:
        y = y + bias.float()
    y = y.to(dtype)
    return y if add is None else add_norm(y, add)
