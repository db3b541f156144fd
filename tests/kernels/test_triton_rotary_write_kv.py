"""The fused rotary + K/V write (kv_write.rotary_write_kv, with Qwen3's per-head q/k
RMSNorm or without) against the ops it replaces: the reference's rms_norm, rotary and
write_kv. GPU, or TRITON_INTERPRET=1 on CPU (float32/float16)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from tandem.kernels import kv_cache_shape, reference  # noqa: E402
from tandem.kernels.reference import elementwise as ref  # noqa: E402
from tandem.kernels.triton.kv_write import rotary_write_kv  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE != "cuda" and not INTERPRET, reason="needs CUDA")]
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
# the reference rotates in the input dtype, the kernel in float32 (as elementwise.rotary)
TOL = {torch.bfloat16: dict(atol=4e-2, rtol=2e-2), torch.float16: dict(atol=5e-3, rtol=2e-3),
       torch.float32: dict(atol=1e-5, rtol=1e-5)}


def _tables(d: int, max_pos: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    emb = torch.cat([torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)] * 2, -1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("t,h,hkv,d", [(1, 32, 4, 128), (7, 8, 2, 64), (3, 12, 12, 64),
                                       (2, 6, 3, 32)])
def test_matches_norm_rotary_write(dtype, norm, t, h, hkv, d):
    g = torch.Generator(device=DEVICE).manual_seed(t * h * d + norm)
    cos, sin = _tables(d)
    qkv = (torch.randn(t, (h + 2 * hkv) * d, device=DEVICE, generator=g) * 2).to(dtype)
    q = qkv[:, :h * d].view(t, h, d)  # strided views of a fused QKV output
    k = qkv[:, h * d:(h + hkv) * d].view(t, hkv, d)
    v = qkv[:, (h + hkv) * d:].view(t, hkv, d)
    pos = torch.randint(0, 4096, (t,), device=DEVICE, generator=g)
    num_blocks, block_size = 8, 16
    base = torch.randn(kv_cache_shape(num_blocks, block_size, hkv, d), device=DEVICE,
                       generator=g).to(dtype)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE, generator=g)[:t]
    slots[0] = -1 if t > 1 else slots[0]  # a padding row of a CUDA-graph batch: no write
    qw = kw = None
    rq, rk, rv = q.clone(), k.clone(), v.clone()
    if norm:
        qw = (1 + 0.2 * torch.randn(d, device=DEVICE, generator=g)).to(dtype)
        kw = (1 + 0.2 * torch.randn(d, device=DEVICE, generator=g)).to(dtype)
        rq, rk = ref.rms_norm(rq, qw, 1e-6), ref.rms_norm(rk, kw, 1e-6)
    rq, rk = ref.rotary(pos, rq, rk, cos, sin)
    expected = base.clone()
    keep = slots >= 0
    reference.write_kv(rk[keep], rv[keep], expected, slots[keep])

    cache = base.clone()
    v_before = v.clone()
    out_q, out_k = rotary_write_kv(pos, q, k, v, cos, sin, cache, slots, (1.0, 1.0), qw, kw,
                                   1e-6)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place
    tol = TOL[dtype]
    torch.testing.assert_close(q, rq, **tol)
    torch.testing.assert_close(k, rk, **tol)
    assert torch.equal(v, v_before)
    torch.testing.assert_close(cache, expected, **tol)
    # the cache holds exactly the returned k (what a fresh prompt attends to directly)
    flat = cache.view(2, -1, hkv, d)
    assert torch.equal(flat[0][slots[keep]], k[keep]) and torch.equal(flat[1][slots[keep]],
                                                                      v[keep])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots[keep]] = False
    assert torch.equal(flat[:, untouched], base.view(2, -1, hkv, d)[:, untouched])


@pytest.mark.skipif(INTERPRET, reason="e4m3 stores need a GPU")
def test_fp8_cache_stores_the_reference_bytes():
    t, h, hkv, d = 5, 8, 2, 128
    cos, sin = _tables(d)
    qkv = torch.randn(t, (h + 2 * hkv) * d, device=DEVICE).to(torch.bfloat16) * 4
    q, k = qkv[:, :h * d].view(t, h, d), qkv[:, h * d:(h + hkv) * d].view(t, hkv, d)
    v = qkv[:, (h + hkv) * d:].view(t, hkv, d)
    pos = torch.arange(t, device=DEVICE) * 7
    shape = kv_cache_shape(4, 16, hkv, d)
    cache = torch.zeros(shape, device=DEVICE, dtype=torch.float8_e4m3fn)
    expected = cache.clone()
    scales = (0.05, 0.02)  # small scales: some values saturate at 448
    rotary_write_kv(pos, q, k, v, cos, sin, cache, torch.arange(t, device=DEVICE) + 3, scales)
    reference.write_kv(k, v, expected, torch.arange(t, device=DEVICE) + 3, scales)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
