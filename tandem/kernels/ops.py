"""The per-token ops the layers call: the fused Triton kernel for CUDA tensors where triton
imports, else the PyTorch reference with the same signature (CPU, and the spec). `linear`
sends single-row half-precision CUDA matmuls (batch-1 decode) to the Triton GEMV; the
quantized linears go to Triton (int8/int4 weight-only) or `torch._scaled_mm` (FP8 W8A8)
on CUDA, to kernels/reference/quant.py elsewhere. `carried_linear`, `carried_int_linear` and
`carried_fp8_linear` (batch-1 decode, models/norm_chain.py) carry an RMSNorm through a
GEMV's input or epilogue (kernels/reference/carried_norm.py)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tandem.kernels.reference import carried_norm as carried_reference
from tandem.kernels.reference import elementwise as reference
from tandem.kernels.reference import moe as moe_reference

from tandem.kernels.reference import quant as quant_reference
from tandem.kernels.reference.carried_norm import AddNorm, NormedRow

try:
    from tandem.kernels.triton import elementwise as fused
    from tandem.kernels.triton import fused_moe as moe_triton
    from tandem.kernels.triton import quant_gemm
    from tandem.kernels.triton.gemv import gemv
    from tandem.kernels.triton.sampling import argmax_rows
except ImportError:  # no triton: CPU-only installs
    fused = gemv = quant_gemm = argmax_rows = moe_triton = None


def _impl(x: torch.Tensor):
    return fused if fused is not None and x.is_cuda else reference


@functools.cache
def _cpu_elementwise():
    from tandem.kernels.cpu import elementwise  # imported late: it needs tandem.kernels
    return elementwise


def _norm_impl(x: torch.Tensor):
    """The norms and rotary: on CPU through kernels/cpu/elementwise.py (C for float32, the
    reference otherwise), so every norm of a CPU model rounds alike."""
    if fused is not None and x.is_cuda:
        return fused
    return _cpu_elementwise() if x.device.type == "cpu" else reference


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm_impl(x).rms_norm(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm_impl(x).fused_add_rms_norm(x, residual, weight, eps)


def sum_add_rms_norm(terms: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_add_rms_norm(terms.sum(1), residual, ...): terms (T, S, H), summed in float32
    and rounded once (as torch's sum), inside the norm's launch on CUDA."""
    return _norm_impl(terms).sum_add_rms_norm(terms, residual, weight, eps)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
           sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _norm_impl(q).rotary(positions, q, k, cos_cache, sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _impl(x).silu_and_mul(x)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """(rows, V) -> (rows,) int64: the first index of each row's maximum (torch.argmax)."""
    if argmax_rows is not None and x.is_cuda and x.dim() == 2 and x.stride(-1) == 1:
        return argmax_rows(x)
    return x.argmax(dim=-1)


def _gemv_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the Triton GEMV computes x W^T: one half-precision CUDA row, W alike."""
    return (gemv is not None and x.is_cuda and x.numel() == x.shape[-1]
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.stride(-1) == 1)


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., in) -> (..., out) = x W^T (+ b)."""
    if _gemv_takes(x, weight):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def _row(x: torch.Tensor | NormedRow) -> torch.Tensor:
    return x.x if isinstance(x, NormedRow) else x


def carried_linear(x: torch.Tensor | NormedRow, weight: torch.Tensor,
                   bias: torch.Tensor | None = None, add: AddNorm | None = None
                   ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
    """`linear` for one row with an RMSNorm carried (kernels/reference/carried_norm.py): x a
    NormedRow and/or `add` -> (NormedRow, new residual). The Triton GEMV on CUDA, else the
    reference."""
    row = _row(x)
    if _gemv_takes(row, weight):
        return gemv(x, weight, bias, add=add)
    return carried_reference.linear(x, weight, bias, row.dtype, add)


def carried_int_linear(x: torch.Tensor | NormedRow, qweight: torch.Tensor,
                       scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                       group_size: int, bias: torch.Tensor | None = None,
                       add: AddNorm | None = None
                       ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
    """`carried_linear` for int8 (bits 8: qweight int8 (N, K), per-channel scales) or int4
    weights (packed as kernels/reference/quant.py)."""
    row = _row(x)
    k = qweight.shape[1] * (8 // bits)
    if (quant_gemm is not None and row.shape[0] == 1
            and quant_gemm.supported(row, k, bits, group_size)):
        return quant_gemm.int_gemv(x, qweight, scales, zeros, bits, group_size, bias, add=add)
    dense = (quant_reference.dequantize_int8(qweight, scales) if bits == 8 else
             quant_reference.dequantize_int4(qweight, scales, zeros, group_size))
    return carried_reference.linear(x, dense, bias, row.dtype, add)


def fp8_row_kernel(wq: torch.Tensor) -> bool:
    """Whether FP8 W8A8 decode rows against e4m3 wq (N, K) run the Triton GEMVs
    (quant_gemm.fp8_gemv; one row, and a carried norm's, on the cast kernel): CUDA with FP8
    support, K a multiple of 512."""
    return (quant_gemm is not None and wq.is_cuda and wq.shape[1] % 512 == 0
            and torch.cuda.get_device_capability(wq.device) >= (8, 9))


def carried_fp8_linear(x: torch.Tensor | NormedRow, wq: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, add: AddNorm | None = None
                       ) -> torch.Tensor | tuple[NormedRow, torch.Tensor]:
    """`carried_linear` for FP8 W8A8 (e4m3 wq (N, K), per-channel scales): the one-row cast
    kernel, which quantizes the row itself (from the producer's amax, where it left one),
    where fp8_row_kernel; else the reference."""
    row = _row(x)
    if (fp8_row_kernel(wq) and row.shape[0] == 1
            and row.dtype in (torch.bfloat16, torch.float16)):
        return quant_gemm.fp8_cast_gemv(x, None, wq, w_scale, bias, row.dtype,
                                        quantize_x=True, add=add)
    return carried_reference.fp8_linear(x, wq, w_scale, bias, row.dtype, add)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    if quant_gemm is not None and quant_gemm.supported(x, qweight.shape[1], 8, 0):
        return quant_gemm.quant_linear(x, qweight, scales, None, 8, 0, bias)
    return quant_reference.int8_linear(x, qweight, scales, bias)


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor | None, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    if quant_gemm is not None and quant_gemm.supported(x, 2 * qweight.shape[1], 4, group_size):
        return quant_gemm.quant_linear(x, qweight, scales, zeros, 4, group_size, bias)
    return quant_reference.int4_linear(x, qweight, scales, zeros, group_size, bias)


def _scaled_mm_ok(x: torch.Tensor, wq: torch.Tensor) -> bool:
    return (quant_gemm is not None and x.is_cuda and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (8, 9)
            and wq.shape[0] % 16 == 0 and wq.shape[1] % 16 == 0)


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: the activation quantized per token, then an e4m3 x e4m3 matmul with row-wise
    scales (fp32 accumulate) on Hopper; the emulating reference elsewhere."""
    if not _scaled_mm_ok(x, wq):
        return quant_reference.fp8_linear(x, wq, w_scale, bias)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] <= quant_gemm.GEMV_MAX_ROWS and fp8_row_kernel(wq):  # decode
        return quant_gemm.fp8_gemv(x2.contiguous(), None, wq, w_scale, bias, x.dtype,
                                   quantize_x=True).reshape(*shape[:-1], wq.shape[0])
    xq, x_scale = quant_gemm.quantize_fp8_per_token(x2.contiguous())
    y = torch._scaled_mm(xq, wq.t(), scale_a=x_scale[:, None], scale_b=w_scale[None, :],
                         out_dtype=x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], wq.shape[0])


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE routing: (T, E) logits -> top_k softmax weights (T, K) float32 (renormalized if
    asked) and expert ids (T, K) int32."""
    if moe_triton is not None and router_logits.is_cuda and router_logits.stride(-1) == 1:
        return moe_triton.select_experts(router_logits, top_k, renormalize)
    return moe_reference.select_experts(router_logits, top_k, renormalize)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """The experts' MLP of a mixture-of-experts layer: x (T, H), w13 (E, 2I, H) gate then up,
    w2 (E, H, I), routing (T, K) weights and ids (-1: expert on another rank) -> (T, H).
    reduce=False: the K weighted expert outputs (T, K, H), unsummed (the caller sums them:
    layers/norm.PartialSums), except on the graph-capturable dense reference (T, H)."""
    if (moe_triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and w13.dtype == x.dtype and w2.dtype == x.dtype):
        return moe_triton.fused_moe(x, w13, w2, topk_weights, topk_ids, reduce=reduce)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():  # no host syncs in a graph
        return moe_reference.fused_moe_dense(x, w13, w2, topk_weights, topk_ids)
    return moe_reference.fused_moe(x, w13, w2, topk_weights, topk_ids, reduce=reduce)
