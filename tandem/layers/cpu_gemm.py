"""Linear layers' matmul on CPU: oneDNN with the weight reordered once, after loading.

A decode step's matmuls are short and wide (a few rows against a weight of thousands of
outputs). There the default BLAS (MKL) is slow on this class of machine, while oneDNN's
kernels on a weight reordered into their blocked layout run up to 2x faster (measured on
the 2-core development machine: a 32000 x 512 LM head takes 13 ms at 48 rows and 5.8 ms
at 8 rows, against 27 and 17 ms through `F.linear`). Prefill-sized inputs go to MKL,
which is as fast there. The reorder happens once per weight in
`process_weights_after_loading` (of `OneDNNLinearMethod`, layers/linear_method.py), and
costs a second copy of each weight in host memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.kernels import ops

ONEDNN_MAX_ROWS = 256  # above this many rows MKL is as fast and needs no second layout
MLP_CHUNK_ROWS = 1024  # prefill MLP in row chunks: intermediates stay small and reused


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-reordered copy of a (out, in) float32 CPU weight, or None where not used."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not onednn_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., in) -> (..., out), through the packed weight when there is one."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if packed is None or x.dtype != torch.float32 or rows == 0:
        return ops.linear(x, weight, bias)
    if rows > ONEDNN_MAX_ROWS:
        return F.linear(x, weight, bias)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]).contiguous(),
                                             packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def in_row_chunks(fn, x: torch.Tensor, out_features: int) -> torch.Tensor:
    """fn(x) for a row-wise fn on CPU, MLP_CHUNK_ROWS rows at a time.

    A prefill of thousands of tokens would otherwise make intermediates of hundreds of MB
    (gate/up of 5k tokens is 60 MB in float32): each one a fresh mmap whose page faults
    cost as much as the matmul around it. Chunks stay in the allocator's reuse range.
    """
    if x.device.type != "cpu" or x.shape[0] <= MLP_CHUNK_ROWS:
        return fn(x)
    out = x.new_empty(x.shape[0], out_features)
    for start in range(0, x.shape[0], MLP_CHUNK_ROWS):
        out[start:start + MLP_CHUNK_ROWS] = fn(x[start:start + MLP_CHUNK_ROWS])
    return out
