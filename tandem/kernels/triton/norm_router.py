"""A MoE layer's post-attention RMSNorm (with its residual add) and its router GEMV in one
launch, for one token (batch-1 decode): what `fused_add_rms_norm` then the router's
`linear` compute, one kernel boundary fewer a MoE layer.

The router is small (E x H: 128 x 2048 for Qwen3-30B-A3B, 0.5 MB), so each of the
cdiv(E, ROWS) programs can redo the norm of the one row (H values from L2) and then take
its ROWS logits; the normalized row and the new residual are stored in slices, one per
program:

    program p:  s = round(x + residual); y = round(round(s * rstd) * norm_w)   (all of H)
                normed[p's slice] = y;  residual_out[p's slice] = s
                logits[p*ROWS : (p+1)*ROWS] = router rows . y                   (float32 sum)

The norm's arithmetic and reduction match elementwise._rms_norm_kernel (same block, same
warps), so normed and residual are bit-equal to the two-launch path; the logits may differ
from the GEMV's in the last float32 bits (another summation order) before rounding. PDL
(pdl.py): the router rows and the norm weight load before `gdc_wait`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.triton.pdl import gdc_launch_dependents, gdc_wait, launch_options

ROWS = 2  # router rows a program
MAX_HIDDEN = 8192  # one block holds the row


@triton.jit
def _add_norm_router_kernel(x_ptr, r_ptr, nw_ptr, gw_ptr, out_ptr, r_out_ptr, logits_ptr,
                            H, E, eps, SLICE, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                            PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    e = pid * ROWS + tl.arange(0, ROWS)
    e_ok = e < E
    nw = tl.load(nw_ptr + cols, mask=mask, other=0.0)  # weights: safe ahead of the wait
    g = tl.load(gw_ptr + e.to(tl.int64)[:, None] * H + cols[None, :],
                mask=e_ok[:, None] & mask[None, :], other=0.0)  # (ROWS, BLOCK)
    if PDL:
        gdc_wait()
    x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(r_out_ptr.dtype.element_ty)  # the add rounds, as in the reference
    x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    y = ((x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
         * nw.to(tl.float32)).to(out_ptr.dtype.element_ty)
    own = mask & (cols >= pid * SLICE) & (cols < pid * SLICE + SLICE)
    tl.store(r_out_ptr + cols, s, mask=own)
    tl.store(out_ptr + cols, y, mask=own)
    logits = tl.sum(g.to(tl.float32) * y.to(tl.float32)[None, :], axis=1)
    tl.store(logits_ptr + e, logits.to(logits_ptr.dtype.element_ty), mask=e_ok)


def supported(x: torch.Tensor, residual: torch.Tensor, gate_weight: torch.Tensor) -> bool:
    """One contiguous half-precision CUDA row, a router of its dtype that fits one block."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] == 1
            and x.dtype in (torch.bfloat16, torch.float16) and residual.dtype == x.dtype
            and gate_weight.dtype == x.dtype and x.is_contiguous() and residual.is_contiguous()
            and gate_weight.is_contiguous() and x.shape[1] <= MAX_HIDDEN)


def add_rms_norm_router(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                        eps: float, gate_weight: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual (1, H); gate_weight (E, H) -> (normed (1, H), x + residual (1, H),
    router logits (1, E)), all in x.dtype (`supported` inputs)."""
    hidden, experts = x.shape[1], gate_weight.shape[0]
    out, r_out = torch.empty_like(x), torch.empty_like(x)
    logits = torch.empty(1, experts, dtype=x.dtype, device=x.device)
    programs = triton.cdiv(experts, ROWS)
    _add_norm_router_kernel[(programs,)](
        x, residual, norm_weight, gate_weight, out, r_out, logits, hidden, experts, eps,
        triton.cdiv(hidden, programs), ROWS=ROWS, BLOCK=triton.next_power_of_2(hidden),
        num_warps=4 if hidden <= 4096 else 8, **launch_options(x))
    return out, r_out, logits
