"""Linear layers' matmul on CPU: a packed copy of each float32 weight, made once after
loading, for the short-and-wide matmuls of decode steps.

A decode step's matmuls are a few rows against a weight of thousands of outputs. There the
default BLAS (MKL, `F.linear`) reaches a third to a half of what the cores can do, so each
weight gets a second copy in a layout made for those shapes:

- `panels` (the default where the CPU kernels build, kernels/cpu/gemm.c): the weight cut
  into panels of a few dozen output rows, each stored transposed, which the C kernel
  multiplies as outer products. The fused CPU decode step (runner/cpu_decode.py) reads the
  same panels, so one copy serves both. A merged gate/up projection keeps its two halves
  in separate panels (`nseg` 2), which lets the fused step apply silu(gate) * up as it
  stores.
- `onednn` (where there is no C compiler): oneDNN's blocked layout
  (`torch.ops.mkldnn._reorder_linear_weight`).

Measured on the 2-core development box (AVX-512, Zen 5; scratch benchmark, best of 20),
GFLOP/s at K 512 / 1536:

    rows   shape (out x in)   F.linear   oneDNN   panels
    1      3072 x 512         37         54-59    78-94
    13     8192 x 512                    250-380  410
    48     3072 x 512         150-172    426-463  460-474
    48     8192 x 512         107-118    383-410  450
    1024   3072 x 512         202        478      450
    5287   3072 x 512         166        290      437
    5287    512 x 1536        196        465      462

So the panels serve every row count, prefill included. oneDNN's copy (the fallback) serves
up to ONEDNN_MAX_ROWS rows; above that `F.linear` on the original weight was as fast on
the AVX2 machine it was measured on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.kernels import ops

ONEDNN_MAX_ROWS = 256  # the oneDNN fallback's limit (above it, F.linear)
MLP_CHUNK_ROWS = 1024  # prefill MLP in row chunks: intermediates stay small and reused


@dataclass
class PackedWeight:
    """A CPU weight's second copy. kind "panels": `tensor` is (panels, in, panel_width),
    the weight's `nseg` equal segments of `seg` output rows each padded to whole panels;
    kind "onednn": `tensor` is oneDNN's reordered weight."""

    kind: str
    tensor: torch.Tensor
    in_features: int
    seg: int
    nseg: int = 1


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _library():
    from tandem.kernels.cpu import load_library
    return load_library()


def available() -> bool:
    """Whether float32 CPU weights get a packed copy (panels or oneDNN)."""
    return _library() is not None or onednn_available()


def pack_panels(weight: torch.Tensor, panel_width: int, nseg: int = 1) -> torch.Tensor:
    """(out, in) -> (panels, in, panel_width): each of `nseg` equal segments of output rows
    padded with zero rows to a multiple of panel_width, cut into panels, each transposed
    (gemm.c's layout)."""
    out, k = weight.shape
    seg = out // nseg
    per = -(-seg // panel_width)
    padded = weight.new_zeros(nseg, per * panel_width, k)
    padded[:, :seg] = weight.detach().view(nseg, seg, k)
    return padded.view(nseg * per, panel_width, k).transpose(1, 2).contiguous()


def pack_weight(weight: torch.Tensor, nseg: int = 1) -> PackedWeight | None:
    """The packed copy of a (out, in) float32 CPU weight (`nseg` equal segments of output
    rows, e.g. 2 for a merged gate/up projection), or None where none is made."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    out, k = weight.shape
    lib = _library()
    if lib is not None:
        if out % nseg:
            nseg = 1
        return PackedWeight("panels", pack_panels(weight, lib.tandem_panel_width(), nseg),
                            k, out // nseg, nseg)
    if onednn_available():
        return PackedWeight("onednn", torch.ops.mkldnn._reorder_linear_weight(
            weight.detach(), None), k, out)
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, packed: PackedWeight | None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., in) -> (..., out), through the packed weight when there is one."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if packed is None or x.dtype != torch.float32 or rows == 0:
        return ops.linear(x, weight, bias)
    if packed.kind == "onednn":
        if rows > ONEDNN_MAX_ROWS:
            return F.linear(x, weight, bias)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]).contiguous(),
                                                 packed.tensor, bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])
    return _panels(x, packed, bias, silu_mul=False)


def _panels(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
            silu_mul: bool) -> torch.Tensor:
    """(..., in) through gemm.c's `tandem_linear_f32` on panels: (..., seg * nseg), or with
    silu_mul (..., seg) = silu(gate) * up."""
    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, x.shape[-1]).contiguous()
    width = packed.seg if silu_mul else packed.seg * packed.nseg
    out = x2.new_empty(rows, width)
    b = None if bias is None else bias.float().contiguous()
    _library().tandem_linear_f32(
        x2.data_ptr(), rows, packed.in_features, packed.tensor.data_ptr(), packed.seg,
        packed.nseg, None if b is None else b.data_ptr(), out.data_ptr(),
        torch.get_num_threads(), int(silu_mul))
    return out.view(*x.shape[:-1], width)


def linear_silu_mul(x: torch.Tensor, packed: PackedWeight | None) -> torch.Tensor | None:
    """silu(gate) * up for a merged gate/up weight packed in two segments, (..., in) ->
    (..., seg), the matmul storing the product directly (no (rows, 2 seg) intermediate);
    None where the weight is not such panels or x is not float32."""
    if (packed is None or packed.kind != "panels" or packed.nseg != 2
            or x.dtype != torch.float32 or x.numel() == 0):
        return None
    return _panels(x, packed, None, silu_mul=True)


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
