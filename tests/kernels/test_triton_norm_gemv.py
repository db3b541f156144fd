"""The fused batch-1 decode matmuls (kernels/triton/norm_gemv.py) against the ops they fuse
(kernels/reference/norm_gemv.py), and a model's fused decode path against its plain one.
GPU only."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
triton = pytest.importorskip("triton")

from tandem.kernels import ops  # noqa: E402
from tandem.kernels.reference import norm_gemv as ref  # noqa: E402
from tandem.kernels.triton import norm_gemv as fused  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _tol(dtype: torch.dtype) -> float:  # relative L2 error of a rounded half-precision dot
    return 1e-2 if dtype == torch.bfloat16 else 2e-3


def _rope_tables(max_pos: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().cuda(), emb.sin().cuda()


def _inputs(k: int, dtype: torch.dtype, residual: bool, g: torch.Generator):
    x = torch.randn(1, k, device="cuda", generator=g).to(dtype) * 2
    r = torch.randn(1, k, device="cuda", generator=g).to(dtype) if residual else None
    nw = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).to(dtype)
    return x, r, nw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h,hkv,d,k", [(32, 8, 128, 4096), (4, 2, 64, 896), (14, 2, 64, 896)])
@pytest.mark.parametrize("residual,bias", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("cache_dtype", ["model", "fp8"])
def test_norm_qkv_rotary_kv_matches_the_ops_it_fuses(dtype, h, hkv, d, k, residual, bias,
                                                     cache_dtype):
    g = torch.Generator(device="cuda").manual_seed(h * k + d)
    x, r, nw = _inputs(k, dtype, residual, g)
    n = (h + 2 * hkv) * d
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    cos, sin = _rope_tables(4096, d)
    pos = torch.tensor([3001], device="cuda")
    fp8 = cache_dtype == "fp8"
    cache = torch.randn(2, 6, 16, hkv, d, device="cuda", generator=g).to(
        torch.float8_e4m3fn if fp8 else dtype)  # poisoned: every other slot must stay
    want_cache = cache.clone()
    slot = torch.tensor([16 * 4 + 9], device="cuda")
    scale = (0.7, 1.9) if fp8 else (1.0, 1.0)
    got, got_res = fused.norm_qkv_rotary_kv(x, r, nw, 1e-5, w, b, pos, cos, sin, cache, slot,
                                            scale, h, hkv)
    want, want_res = ref.norm_qkv_rotary_kv(x, r, nw, 1e-5, w, b, pos, cos, sin, want_cache,
                                            slot, scale, h, hkv)
    assert got.shape == want.shape and got.dtype == dtype
    assert torch.equal(got_res, want_res)  # the residual stream rounds like the reference
    assert _rel(got, want) < _tol(dtype)
    raw, want_raw = (c.view(torch.uint8).view(2, 6 * 16, -1) for c in (cache, want_cache))
    others = torch.ones(raw.shape[1], dtype=torch.bool, device="cuda")
    others[slot] = False
    assert torch.equal(raw[:, others], want_raw[:, others])
    # the slot: FP8 values one e4m3 step (1/8) apart where an input's rounding flipped it
    vals, want_vals = (c.float().view(2, -1, hkv * d)[:, slot] for c in (cache, want_cache))
    assert _rel(vals, want_vals) < (0.05 if fp8 else _tol(dtype))


def test_norm_qkv_rotary_kv_skips_a_negative_slot_and_takes_any_tile():
    g = torch.Generator(device="cuda").manual_seed(7)
    x, r, nw = _inputs(4096, torch.bfloat16, True, g)
    w = (torch.randn(6144, 4096, device="cuda", generator=g) / 64).to(torch.bfloat16)
    cos, sin = _rope_tables(64, 128)
    pos = torch.tensor([5], device="cuda")
    cache = torch.randn(2, 2, 16, 8, 128, device="cuda", generator=g).to(torch.bfloat16)
    before = cache.clone()
    want, _ = ref.norm_qkv_rotary_kv(x, r, nw, 1e-5, w, None, pos, cos, sin, cache.clone(),
                                     torch.tensor([0], device="cuda"), (1.0, 1.0), 32, 8)
    for config in [None, (2, 1024, 8, 4), (8, 512, 4, 3), (16, 2048, 8, 2), (64, 256, 4, 2)]:
        got, _ = fused.norm_qkv_rotary_kv(x, r, nw, 1e-5, w, None, pos, cos, sin, cache,
                                          torch.tensor([-1], device="cuda"), (1.0, 1.0), 32, 8,
                                          config=config)
        assert torch.equal(cache, before)
        assert _rel(got, want) < 1e-2, config


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inter,k", [(14336, 4096), (4864, 896), (1000, 777)])
@pytest.mark.parametrize("residual,bias", [(True, False), (False, True)])
@pytest.mark.parametrize("config", [None, (8, 512, 4, 3), (16, 1024, 8, 2)])
def test_norm_gate_up_silu_matches_the_ops_it_fuses(dtype, inter, k, residual, bias, config):
    g = torch.Generator(device="cuda").manual_seed(inter + k)
    x, r, nw = _inputs(k, dtype, residual, g)
    w = (torch.randn(2 * inter, k, device="cuda", generator=g) / k**0.5).to(dtype)
    b = torch.randn(2 * inter, device="cuda", generator=g).to(dtype) if bias else None
    got, got_res = fused.norm_gate_up_silu(x, r, nw, 1e-6, w, b, config=config)
    want, want_res = ref.norm_gate_up_silu(x, r, nw, 1e-6, w, b)
    assert got.shape == (1, inter) and got.dtype == dtype
    assert torch.equal(got_res, want_res)
    if not residual:
        assert got_res is x  # the first layer: its input is the residual
    assert _rel(got, want) < 2 * _tol(dtype)


def test_ops_route_one_cuda_row_to_the_kernel_and_the_rest_to_the_reference():
    w = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(256, device="cuda", dtype=torch.bfloat16)
    one = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16)
    assert ops.norm_gemv_supported(one, w)
    assert not ops.norm_gemv_supported(torch.randn(2, 256, device="cuda", dtype=torch.bfloat16), w)
    assert not ops.norm_gemv_supported(one.float(), w.float())
    assert not ops.norm_gemv_supported(one.cpu(), w.cpu())
    got, _ = ops.norm_gate_up_silu(one, None, nw, 1e-6, w, None)
    assert torch.equal(got, fused.norm_gate_up_silu(one, None, nw, 1e-6, w, None)[0])
    rows = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    got, _ = ops.norm_gate_up_silu(rows, None, nw, 1e-6, w, None)
    assert torch.equal(got, ref.norm_gate_up_silu(rows, None, nw, 1e-6, w, None)[0])


def _decode_logits(model, monkeypatch, fusion: str, block_size: int = 16):
    """A 9-token prompt, then 6 one-token decodes; (decode logits, KV caches)."""
    from tests.model_factory import make_attn_metadata
    monkeypatch.setenv("TANDEM_DECODE_FUSION", fusion)
    monkeypatch.setenv("TANDEM_NORM_CHAIN", "0")  # plain: the norms as kernels
    dtype = next(model.parameters()).dtype
    for layer in model.attention_layers():
        layer.kv_cache = torch.zeros(layer.kv_cache_shape(8, block_size), dtype=dtype,
                                     device="cuda")
    table = [6, 2, 5]
    prompt = [3, 17, 99, 4, 250, 8, 61, 12, 140]
    out = []
    with torch.no_grad():
        meta = make_attn_metadata([9], [9], [table], block_size, "cuda")
        model(torch.tensor(prompt, device="cuda"), torch.arange(9, device="cuda"), meta)
        for step, tok in enumerate([11, 42, 7, 300, 5, 19]):
            n = 10 + step
            meta = make_attn_metadata([1], [n], [table], block_size, "cuda")
            hidden = model(torch.tensor([tok], device="cuda"), torch.tensor([n - 1], device="cuda"),
                           meta)
            out.append(model.compute_logits(hidden))
    return torch.cat(out).float(), [a.kv_cache.clone() for a in model.attention_layers()]


@pytest.mark.parametrize("arch,kw", [("LlamaForCausalLM", {}),
                                     ("Qwen2ForCausalLM", {}),  # q/k/v biases
                                     ("LlamaForCausalLM", dict(head_dim=128, num_heads=2,
                                                               num_kv_heads=1)),
                                     ("Qwen3ForCausalLM", dict(head_dim=32))])  # MLP half only
def test_fused_decode_path_matches_the_plain_one(tmp_path, monkeypatch, arch, kw):
    from tandem.models import fused_decode
    from tandem.models.loader import load_model
    from tests.model_factory import make_tiny_model
    model = load_model(make_tiny_model(tmp_path, arch, **kw), torch.bfloat16, "cuda")
    layer = model.model.layers[0]
    hidden = torch.zeros(1, model.hidden_size, device="cuda", dtype=torch.bfloat16)
    monkeypatch.delenv("TANDEM_DECODE_FUSION", raising=False)
    assert not fused_decode.applies(layer, hidden)  # opt-in
    monkeypatch.setenv("TANDEM_DECODE_FUSION", "1")
    assert fused_decode.applies(layer, hidden)
    assert fused_decode.attention_fusable(layer) == (arch != "Qwen3ForCausalLM")
    plain, plain_kv = _decode_logits(model, monkeypatch, "0")
    got, got_kv = _decode_logits(model, monkeypatch, "1")
    assert _rel(got, plain) < 2e-2
    assert (got.argmax(-1) == plain.argmax(-1)).float().mean() >= 5 / 6
    assert max(_rel(a, b) for a, b in zip(got_kv, plain_kv)) < 2e-2
