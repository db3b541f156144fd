"""GPTQ for INT4 weights, group-wise (Frantar et al., 2022): round one input column at a
time and push its rounding error onto the columns not yet rounded, weighted by how the
layer's inputs correlate, so that the layer's *output* on calibration data moves least.

    H = sum over calibration tokens of x x^T        (K, K), the inputs of this linear
    H += damp * mean(diag H) * I;  U = upper Cholesky factor of H^-1
    for each group of G columns (its scale and zero point from the columns as they are
    now, the clip ratio chosen by the error weighted with diag H: activation-aware):
        for column j of the group:
            q_j = round(w_j / s) ...                      round to nearest, as RTN
            e_j = (w_j - dequant(q_j)) / U[j, j]
            w_{j+1..} -= e_j U[j, j+1..]                   the rest of the group at once
        w_{after the group} -= E U[group, after]           one matmul a group

Rows are independent (the error moves along a row), so fused projections (q, k, v; gate,
up) can be done together or apart with the same result. The output is exactly what
`quantize_int4` returns (packed codes, scales, zero points), so the same kernels and the
same checkpoint writer serve both. Calibration itself (which inputs, in which order) is in
`calibrate.py`.
"""

from __future__ import annotations

import torch

from tandem.kernels.reference.quant import check_int4_groups, int4_group_params, pack_int4


def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, group_size: int = 128,
              symmetric: bool = True, damp: float = 0.01,
              scale_dtype: torch.dtype | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """w (N, K), hessian (K, K) = sum x x^T over calibration inputs -> (packed uint8
    (N, K/2), scales (N, K/G) float32, zeros (N, K/G) uint8 or None), the layout of
    quantize_int4. Inputs that never fire (zero diagonal) get zero weights, as in GPTQ.
    scale_dtype: scales rounded to it before rounding the codes (bf16 for a bf16
    checkpoint), so a checkpoint storing them in it dequantizes exactly."""
    n, k = w.shape
    check_int4_groups(k, group_size)
    if hessian.shape != (k, k):
        raise ValueError(f"hessian {tuple(hessian.shape)} does not match in_features {k}")
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    importance = H.diagonal()
    codes = torch.empty(n, k, device=W.device)
    scales, zeros = [], []
    for g0 in range(0, k, group_size):
        g1 = g0 + group_size
        W1 = W[:, g0:g1]  # a view: updated in place
        _, scale, z = int4_group_params(W1, symmetric, importance=importance[g0:g1],
                                        scale_dtype=scale_dtype)
        offset = 8.0 if z is None else z
        err = torch.empty_like(W1)
        U1 = U[g0:g1, g0:g1]
        for j in range(group_size):
            col = W1[:, j]
            q = torch.round(col / scale + offset).clamp(0, 15)
            e = (col - (q - offset) * scale) / U1[j, j]
            W1[:, j + 1:] -= e[:, None] * U1[j, j + 1:][None, :]
            err[:, j] = e
            codes[:, g0 + j] = q
        W[:, g1:] -= err @ U[g0:g1, g1:]
        scales.append(scale)
        zeros.append(z)
    return (pack_int4(codes), torch.stack(scales, dim=1),
            None if symmetric else torch.stack(zeros, dim=1).to(torch.uint8))
