"""An RMSNorm carried by the two matmuls around it, at batch-1 decode: the spec of the GEMVs'
`add` epilogue and `NormedRow` input (kernels/triton/gemv.py, quant_gemm.py), which
models/norm_chain.py chains so that a Llama layer launches no norm kernel:

    producer (o_proj, down_proj)   y = round(x W^T (+ b));  s = round(y + residual)  (the
                                   new residual);  xn = round(s * w_norm);  sumsq = sum s^2
    consumer (qkv, gate_up)        y = round((xn W^T) * rsqrt(sumsq / K + eps) (+ b)), the
                                   product and the scale in float32

The producer also leaves amax = max |xn|, for an FP8 W8A8 consumer: it quantizes xn per row
(e4m3 with scale amax / 448; the norm's scale r cancels in x / scale, so xn quantizes as r xn
would) without a pass over the row of its own, and its output takes r like any consumer's.

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

from tandem.kernels.reference import quant


@dataclass(frozen=True, slots=True)
class NormedRow:
    """rmsnorm(s) for one row, its scale not yet applied: value = x * rsqrt(sum(sumsq) / K
    + eps). x (1, K) in the model dtype = round(s * w_norm); sumsq (P,) float32, partial sums
    of s^2 over the row; amax (P,) float32, partial maxima of |x| (None: not known)."""
    x: torch.Tensor
    sumsq: torch.Tensor
    eps: float
    amax: torch.Tensor | None = None

    def scale(self) -> torch.Tensor:
        """rsqrt(mean(s^2) + eps), float32 (a 0-d tensor)."""
        return torch.rsqrt(self.sumsq.sum() / self.x.shape[-1] + self.eps)


@dataclass(frozen=True, slots=True)
class AddNorm:
    """What a producer's epilogue needs: the residual stream to add its output to, and the
    weight and eps of the RMSNorm that follows; amax: also leave max |xn| (the consumer is
    FP8 W8A8)."""
    residual: torch.Tensor
    weight: torch.Tensor
    eps: float
    amax: bool = False


def add_norm(y: torch.Tensor, add: AddNorm) -> tuple[NormedRow, torch.Tensor]:
    """A producer's epilogue on its rounded output y: (the next norm's NormedRow, s)."""
    s = y + add.residual
    s32 = s.float()
    xn = (s32 * add.weight.float()).to(s.dtype)
    amax = xn.abs().amax(-1).float().reshape(1) if add.amax else None
    return NormedRow(xn, s32.pow(2).sum(-1).reshape(1), add.eps, amax), s


def linear(x: torch.Tensor | NormedRow, weight: torch.Tensor, bias: torch.Tensor | None,
           dtype: torch.dtype, add: AddNorm | None = None
           ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
    """x W^T (+ b) with either end carried: x a NormedRow (the consumer), `add` (the
    producer: returns (NormedRow, s)). weight: dense (a quantized method's dequantized
    weight), any float dtype; the product is float32, rounded to `dtype` once."""
    xin = x.x if isinstance(x, NormedRow) else x
    return _finish(F.linear(xin.float(), weight.float()), x, bias, dtype, add)


def fp8_linear(x: torch.Tensor | NormedRow, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, dtype: torch.dtype, add: AddNorm | None = None
               ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
    """`linear` for FP8 W8A8 (quant.fp8_linear): the row (a NormedRow's x, before its scale)
    quantized per row to e4m3, times e4m3 wq (N, K) with per-channel scales w_scale (N,)."""
    xq, x_scale = quant.quantize_fp8(x.x if isinstance(x, NormedRow) else x)
    y = (xq.float() @ wq.float().t()) * x_scale[:, None] * w_scale[None, :]
    return _finish(y, x, bias, dtype, add)


def _finish(y: torch.Tensor, x: torch.Tensor | NormedRow, bias: torch.Tensor | None,
            dtype: torch.dtype, add: AddNorm | None
            ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
    """A float32 product's norm scale, bias, rounding and producer epilogue."""
    if isinstance(x, NormedRow):
        y = y * x.scale()
    if bias is not None:
        y = y + bias.float()
    y = y.to(dtype)
    return y if add is None else add_norm(y, add)
