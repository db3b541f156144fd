"""Fused Triton RMSNorm(+residual), rotary and SiLU-and-mul against their PyTorch
references (tandem.kernels.reference.elementwise). GPU only."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
triton = pytest.importorskip("triton")

from tandem.kernels.reference import elementwise as ref  # noqa: E402
from tandem.kernels.triton import elementwise as fused  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _tol(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 4096), (7, 512), (300, 4096), (5, 896), (64, 128)])
def test_rms_norm_and_fused_add(dtype, rows, d):
    g = torch.Generator(device="cuda").manual_seed(rows * d)
    x = torch.randn(rows, d, device="cuda", generator=g).to(dtype) * 3
    r = torch.randn(rows, d, device="cuda", generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(d, device="cuda", generator=g)).to(dtype)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), **_tol(dtype))
    out, res = fused.fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = ref.fused_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(res, ref_res)  # the residual stream rounds exactly like the reference
    torch.testing.assert_close(out, ref_out, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,terms,d", [(1, 8, 2048), (3, 2, 4096), (5, 4, 896)])
def test_sum_add_rms_norm(dtype, rows, terms, d):
    """A MoE layer's K expert outputs summed inside the next norm's residual add
    (layers/norm.PartialSums), against the reference: sum, add, norm."""
    g = torch.Generator(device="cuda").manual_seed(rows * terms + d)
    t = torch.randn(rows, terms, d, device="cuda", generator=g).to(dtype)
    r = torch.randn(rows, d, device="cuda", generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(d, device="cuda", generator=g)).to(dtype)
    out, res = fused.sum_add_rms_norm(t, r, w, 1e-6)
    ref_out, ref_res = ref.sum_add_rms_norm(t, r, w, 1e-6)
    # the sum rounds once, but its float32 order may differ from torch's: an ulp at most
    torch.testing.assert_close(res, ref_res, **_tol(dtype))
    torch.testing.assert_close(out, ref_out, **_tol(dtype))
    # and equal to summing first with the separate kernels (the path it replaces)
    from tandem.kernels.triton.fused_moe import sum_slots
    out2, res2 = fused.fused_add_rms_norm(sum_slots(t.reshape(-1, d), rows, terms), r, w, 1e-6)
    assert torch.equal(res, res2) and torch.equal(out, out2)


def test_rms_norm_on_a_strided_3d_view():
    qkv = torch.randn(9, 3 * 4 * 64, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, :256].view(9, 4, 64)  # per-head norm (Qwen3) on a view of the fused output
    w = torch.rand(64, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(fused.rms_norm(q, w, 1e-6), ref.rms_norm(q, w, 1e-6),
                               **_tol(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,h,hkv,d", [(1, 32, 8, 128), (33, 8, 2, 64), (5, 12, 12, 64),
                                       (2, 28, 4, 128), (3, 16, 1, 32)])
def test_rotary_in_place_on_qkv_views(dtype, t, h, hkv, d):
    max_pos = 4096
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().cuda(), emb.sin().cuda()
    qkv = torch.randn(t, (h + 2 * hkv) * d, device="cuda").to(dtype)
    pos = torch.randint(0, max_pos, (t,), device="cuda")
    q = qkv[:, :h * d].view(t, h, d)
    k = qkv[:, h * d:(h + hkv) * d].view(t, hkv, d)
    v_before = qkv[:, (h + hkv) * d:].clone()
    ref_q, ref_k = ref.rotary(pos, q.clone(), k.clone(), cos, sin)
    out_q, out_k = fused.rotary(pos, q, k, cos, sin)
    torch.testing.assert_close(out_q, ref_q, **_tol(dtype))
    torch.testing.assert_close(out_k, ref_k, **_tol(dtype))
    assert torch.equal(qkv[:, (h + hkv) * d:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 14336), (17, 1536), (256, 4096), (3, 100)])
def test_silu_and_mul(dtype, rows, d):
    x = torch.randn(rows, 2 * d, device="cuda").to(dtype) * 4
    torch.testing.assert_close(fused.silu_and_mul(x), ref.silu_and_mul(x), **_tol(dtype))
