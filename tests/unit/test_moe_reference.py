"""The mixture-of-experts reference (kernels/reference/moe.py) against the formula written as
a loop over tokens and slots in float64: routing, top-k weights, -1 ids (experts on other
ranks), experts that get no token, and the dispatch in kernels/ops.py on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import ops
from tandem.kernels.reference.moe import fused_moe


def naive(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """out[t] = sum_k w[t, k] * down_e(silu(gate_e x[t]) * up_e x[t]), one (t, k) at a time."""
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            if e < 0:
                continue
            gu = w13[e].double() @ x[t].double()
            h = F.silu(gu[:inter]) * gu[inter:]
            out[t] += float(topk_weights[t, k]) * (w2[e].double() @ h)
    return out


def make(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, seed: int,
         dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    topk_weights, topk_ids = torch.softmax(logits, -1).topk(top_k, dim=-1)
    return x, w13, w2, topk_weights, topk_ids.to(torch.int32)


@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k", [
    (1, 16, 8, 1, 1), (3, 24, 40, 4, 2), (17, 32, 16, 8, 2), (40, 16, 24, 60, 4),
    (64, 8, 8, 8, 8)])
def test_matches_per_token_loop(num_tokens, hidden, inter, num_experts, top_k):
    x, w13, w2, w, ids = make(num_tokens, hidden, inter, num_experts, top_k, seed=num_tokens)
    out = fused_moe(x, w13, w2, w, ids)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), naive(x, w13, w2, w, ids), rtol=1e-5, atol=1e-5)
    # int64 ids and the ops dispatcher (the reference on CPU) agree
    torch.testing.assert_close(ops.fused_moe(x, w13, w2, w, ids.long()), out, rtol=0, atol=0)


def test_minus_one_ids_contribute_nothing():
    x, w13, w2, w, ids = make(12, 16, 8, 6, 3, seed=1)
    dropped = ids.clone()
    dropped[::2, 0] = -1  # even tokens lose their first expert (it lives on another rank)
    dropped[5] = -1  # token 5 has no local expert at all
    out = fused_moe(x, w13, w2, w, dropped)
    torch.testing.assert_close(out.double(), naive(x, w13, w2, w, dropped), rtol=1e-5, atol=1e-5)
    assert torch.all(out[5] == 0)
    # the same as zeroing those slots' weights
    zeroed = torch.where(dropped < 0, 0.0, w)
    torch.testing.assert_close(out, fused_moe(x, w13, w2, zeroed, ids), rtol=1e-6, atol=1e-6)
    assert torch.all(fused_moe(x, w13, w2, w, torch.full_like(ids, -1)) == 0)


def test_empty_experts_are_skipped():
    """Only experts 1 and 4 of 8 receive tokens; the others' weights are NaN, so touching
    them would show."""
    x, w13, w2, w, _ = make(9, 16, 8, 8, 2, seed=2)
    ids = torch.tensor([[1, 4], [4, 1], [1, 4]] * 3, dtype=torch.int64)
    unused = [e for e in range(8) if e not in (1, 4)]
    w13[unused] = float("nan")
    w2[unused] = float("nan")
    out = fused_moe(x, w13, w2, w, ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), naive(x, w13, w2, w, ids), rtol=1e-5, atol=1e-5)


def test_topk_weights_scale_each_slot():
    x, w13, w2, w, ids = make(5, 16, 8, 4, 2, seed=3)
    single = [fused_moe(x, w13, w2, torch.ones(5, 1), ids[:, k:k + 1]) for k in range(2)]
    expected = w[:, :1] * single[0] + w[:, 1:] * single[1]
    torch.testing.assert_close(fused_moe(x, w13, w2, w, ids), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_moe(x, w13, w2, 2 * w, ids), 2 * expected, rtol=1e-5,
                               atol=1e-6)


def test_bfloat16_sums_in_float32():
    x, w13, w2, w, ids = make(16, 64, 32, 4, 2, seed=4, dtype=torch.bfloat16)
    out = fused_moe(x, w13, w2, w, ids)
    assert out.dtype == torch.bfloat16
    ref = naive(x, w13, w2, w, ids)
    # one rounding to bf16 at the end: within half an ulp (2^-8 relative) of the exact sum
    assert ((out.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-6).all()


def test_no_tokens():
    x, w13, w2, w, ids = make(0, 16, 8, 4, 2, seed=5)
    assert fused_moe(x, w13, w2, w, ids).shape == (0, 16)


def test_dense_form_equals_the_grouped_one():
    """The capturable form (every expert over every token) computes the same sums."""
    from tandem.kernels.reference.moe import fused_moe, fused_moe_dense
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 16, generator=g)
    w13, w2 = torch.randn(5, 24, 16, generator=g), torch.randn(5, 16, 12, generator=g)
    ids = torch.randint(-1, 5, (9, 2), generator=g)
    w = torch.rand(9, 2, generator=g)
    torch.testing.assert_close(fused_moe_dense(x, w13, w2, w, ids), fused_moe(x, w13, w2, w, ids),
                               rtol=1e-5, atol=1e-5)
