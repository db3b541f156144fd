"""Linear layers' matmul on CPU: oneDNN with the weight packed once, after loading.

On CPU, inference matmuls are short and wide (a decode step has a few rows against a
weight of thousands), where oneDNN's packed kernels beat the default BLAS by up to ~40%
(measured on the 2-core development machine for a 32000 x 512 LM head at 1-20 rows).
Packing happens once per weight in `process_weights_after_loading`; elsewhere (CUDA,
half precision, no oneDNN) `linear` is plain `F.linear`. Costs a second copy of each
packed weight in host memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-packed copy of a (out, in) float32 CPU weight, or None where not used."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32
            or not torch.backends.mkldnn.is_available()):
        return None
    return weight.detach().to_mkldnn()


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., in) -> (..., out), through the packed weight when there is one."""
    if packed is None or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1]).contiguous().to_mkldnn()
    out = torch._C._nn.mkldnn_linear(rows, packed, bias).to_dense()
    return out.view(*x.shape[:-1], out.shape[-1])
