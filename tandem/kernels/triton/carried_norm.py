"""The two ends of a carried RMSNorm in a GEMV (spec: kernels/reference/carried_norm.py), shared
by the bf16 GEMV (gemv.py) and the int8/int4 and FP8 ones (quant_gemm.py):

    norm_scale       the consumer's rsqrt(sum(sumsq) / K + eps), from the producer's P
                     partial sums (one a program: 1-4 KB from L2, once a program, after
                     its loop)
    add_norm_store   the producer's epilogue: y rounded, s = round(y + residual) stored,
                     xn = round(s * w_norm) stored as the GEMV's output, and the program's
                     sum of s^2 stored at sumsq[pid] (AMAX_OUT, for an FP8 consumer: its
                     max |xn| at amax[pid], which the consumer reduces with row_amax)

Loading the partial sums, the residual and w_norm ahead of the loop instead (their latency
under the weight stream) measured slower on the H200: +140 us a step in bf16, +90 in int8
(the values held in registers through the loop; bench/results/2026-12-01-h200-norm-chain/).

Partial sums rather than one atomic float: the consumer adds them in one order every replay,
so a graph gives the same logits each time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels.reference.carried_norm import AddNorm, NormedRow


@triton.jit
def norm_scale(ss_ptr, P, K, eps, P_BLOCK: tl.constexpr):
    p = tl.arange(0, P_BLOCK)
    ss = tl.sum(tl.load(ss_ptr + p, mask=p < P, other=0.0), 0)
    return 1.0 / tl.sqrt(ss / K + eps)


@triton.jit
def row_amax(am_ptr, P, P_BLOCK: tl.constexpr):
    """max |xn| over the row, from the producer's P partial maxima (exact: max is)."""
    p = tl.arange(0, P_BLOCK)
    return tl.max(tl.load(am_ptr + p, mask=p < P, other=0.0), 0)


@triton.jit
def add_norm_store(y, n, n_ok, pid, r_ptr, nw_ptr, s_ptr, xn_ptr, ss_ptr, am_ptr,
                   AMAX_OUT: tl.constexpr):
    """y (BLOCK_N,) float32: output rows n of this program, bias added."""
    dt = s_ptr.dtype.element_ty
    r = tl.load(r_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    s = (y.to(dt).to(tl.float32) + r).to(dt)
    tl.store(s_ptr + n, s, mask=n_ok)
    s32 = s.to(tl.float32)
    nw = tl.load(nw_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    xn = (s32 * nw).to(xn_ptr.dtype.element_ty)
    tl.store(xn_ptr + n, xn, mask=n_ok)
    tl.store(ss_ptr + pid, tl.sum(tl.where(n_ok, s32 * s32, 0.0), 0))
    if AMAX_OUT:  # only where asked: a second reduction at every program's end
        tl.store(am_ptr + pid, tl.max(tl.where(n_ok, tl.abs(xn.to(tl.float32)), 0.0), 0))


def norm_args(x: torch.Tensor | NormedRow) -> tuple[torch.Tensor, tuple, dict]:
    """(the row, (sumsq, P, eps) kernel args, constexprs) of a GEMV input; the sumsq
    slot holds a dummy pointer when x is a plain tensor."""
    if isinstance(x, NormedRow):
        p = x.sumsq.numel()
        return x.x, (x.sumsq, p, x.eps), dict(NORM_IN=True,
                                              P_BLOCK=max(16, triton.next_power_of_2(p)))
    return x, (x, 1, 0.0), dict(NORM_IN=False, P_BLOCK=16)


def add_args(add: AddNorm | None, y: torch.Tensor, programs: int
             ) -> tuple[tuple, dict, torch.Tensor | None, torch.Tensor | None]:
    """((residual, w_norm, s, sumsq, amax) kernel args, constexprs, s, parts (2, programs):
    sums of squares and maxima) of a producer GEMV writing y with `programs` programs;
    dummies (y) when add is None."""
    if add is None:
        return (y, y, y, y, y), dict(ADD_NORM=False, AMAX_OUT=False), None, None
    assert add.residual.shape == y.shape and add.residual.is_contiguous(), \
        "the residual must be one contiguous row shaped like the output"
    s = torch.empty_like(y)
    parts = torch.empty(2 if add.amax else 1, programs, dtype=torch.float32, device=y.device)
    return ((add.residual, add.weight, s, parts[0], parts[-1]),
            dict(ADD_NORM=True, AMAX_OUT=add.amax), s, parts)


def normed_row(y: torch.Tensor, parts: torch.Tensor, add: AddNorm) -> NormedRow:
    """A producer GEMV's output row as the next norm's NormedRow (parts: add_args')."""
    return NormedRow(y, parts[0], add.eps, parts[1] if add.amax else None)
