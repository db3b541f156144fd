"""The Triton GEMV (single-row matmul, batch-1 decode) against F.linear. Needs CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from tandem.kernels import ops  # noqa: E402
from tandem.kernels.triton.gemv import gemv  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 777), (5, 64),
                                 (32003, 1536)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(n, k, dtype, bias):
    torch.manual_seed(n + k)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    x = torch.randn(1, k, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = gemv(x, w, b)
    assert got.shape == (1, n) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_ops_linear_routes_one_row_only():
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    for rows in (1, 3):
        x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(ops.linear(x, w).float(), F.linear(x, w).float(),
                                   atol=3e-2, rtol=2e-2)
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(ops.linear(x, w), gemv(x, w))  # the one-row case is the GEMV
