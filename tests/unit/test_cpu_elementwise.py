"""RMSNorm (with the residual add) and rotary on CPU float32 through kernels/cpu/
elementwise.c against the reference (kernels/reference/elementwise.py, the spec), including
views into a fused qkv row and the fallbacks for what the C code does not take."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels import ops
from tandem.kernels.cpu import elementwise as cpu
from tandem.kernels.cpu import load_library
from tandem.kernels.reference import elementwise as reference

needs_kernel = pytest.mark.skipif(load_library() is None, reason="no C compiler")


@needs_kernel
@pytest.mark.parametrize("rows, dim", [(1, 64), (7, 100), (300, 512)])
def test_rms_norm_matches_reference(rows: int, dim: int) -> None:
    g = torch.Generator().manual_seed(rows * dim)
    x = torch.randn(rows, dim, generator=g) * 3
    res = torch.randn(rows, dim, generator=g)
    w = torch.randn(dim, generator=g)
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    got, got_res = cpu.fused_add_rms_norm(x, res, w, 1e-6)
    want, want_res = reference.fused_add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_res, want_res)
    # a view with a row stride (every other row) and a 3-D input
    torch.testing.assert_close(cpu.rms_norm(x[::2], w, 1e-5), reference.rms_norm(x[::2], w, 1e-5))
    x3 = x.view(1, rows, dim)
    torch.testing.assert_close(cpu.rms_norm(x3, w, 1e-5), reference.rms_norm(x3, w, 1e-5))


@needs_kernel
@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim", [(1, 4, 2, 16), (37, 8, 2, 64),
                                                               (5, 3, 1, 6)])
def test_rotary_matches_reference_on_qkv_views(tokens: int, heads: int, kv_heads: int,
                                               head_dim: int) -> None:
    """q and k as the attention layer passes them: views into one (T, qkv) tensor."""
    g = torch.Generator().manual_seed(tokens + heads + head_dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    angles = torch.rand(64, head_dim // 2, generator=g) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1)
    sin = torch.cat([angles.sin(), angles.sin()], -1)
    positions = torch.randint(0, 64, (tokens,), generator=g)
    got_q, got_k = cpu.rotary(positions, q, k, cos, sin)
    want_q, want_k = reference.rotary(positions, q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)


def test_what_the_c_code_does_not_take_goes_to_the_reference() -> None:
    """bfloat16, a transposed input, and ops' dispatch of CPU tensors: the same values."""
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    w = torch.randn(32, dtype=torch.bfloat16)
    assert torch.equal(ops.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    xt = torch.randn(32, 6).t()  # last dim not unit stride
    wf = w.float()
    torch.testing.assert_close(ops.rms_norm(xt, wf, 1e-5), reference.rms_norm(xt, wf, 1e-5))
    q = torch.randn(3, 2, 8, dtype=torch.bfloat16)
    cos, sin = torch.ones(4, 8), torch.zeros(4, 8)
    got_q, _ = ops.rotary(torch.tensor([0, 1, 2]), q, q[:, :1], cos, sin)
    assert torch.equal(got_q, q)
