"""The carried RMSNorm on the CPU (kernels/reference/carried_norm.py, models/norm_chain.py):
the chain's one-token decode against the plain decoder layers, through the references (the
GPU's kernels: tests/kernels/test_triton_carried_norm.py), and when the chain applies."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels.reference import carried_norm as ref
from tandem.kernels.reference.elementwise import rms_norm
from tandem.models import norm_chain
from tandem.models.loader import load_model
from tandem.quantization.policy import QuantPolicy
from tests.model_factory import make_attn_metadata, make_tiny_model

TINY = dict(hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256,
            num_layers=3)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _decode(model, chain: bool, block_size: int = 16):
    """A 9-token prompt (plain), then 6 one-token decodes, through the chain or the plain
    layers: (logits (6, V), KV caches)."""
    dtype = model.model.embed_tokens.weight.dtype
    for layer in model.attention_layers():
        layer.kv_cache = torch.zeros(layer.kv_cache_shape(8, block_size), dtype=dtype)
    table = [6, 2, 5]
    out = []
    with torch.no_grad():
        meta = make_attn_metadata([9], [9], [table], block_size)
        model(torch.tensor([3, 17, 99, 4, 250, 8, 61, 12, 140]), torch.arange(9), meta)
        for step, tok in enumerate([11, 42, 7, 300, 5, 19]):
            n = 10 + step
            meta = make_attn_metadata([1], [n], [table], block_size)
            ids, pos = torch.tensor([tok]), torch.tensor([n - 1])
            hidden = (norm_chain.forward(model.model, ids, pos, meta) if chain
                      else model.model(ids, pos, meta))
            out.append(model.compute_logits(hidden))
    return torch.cat(out).float(), [a.kv_cache.clone() for a in model.attention_layers()]


@pytest.mark.parametrize("arch,kw", [("LlamaForCausalLM", {}),
                                     ("Qwen2ForCausalLM", {}),  # q/k/v biases
                                     ("Qwen3ForCausalLM", dict(head_dim=32))])  # q/k norms
@pytest.mark.parametrize("quant", [None, "int8", "int4", "int4_asym"])
def test_the_chain_decodes_like_the_plain_layers(tmp_path, arch, kw, quant):
    model = load_model(make_tiny_model(tmp_path, arch, **TINY, **kw), torch.bfloat16, "cpu",
                       quant=QuantPolicy.parse(quant))
    assert norm_chain.chainable(model.model)
    plain, plain_kv = _decode(model, chain=False)
    got, got_kv = _decode(model, chain=True)
    assert _rel(got, plain) < 2e-2
    assert (got.argmax(-1) == plain.argmax(-1)).float().mean() >= 5 / 6
    assert max(_rel(a, b) for a, b in zip(got_kv, plain_kv)) < 2e-2
    assert not torch.equal(got, plain)  # a different computation, not the plain one again


@pytest.mark.parametrize("arch,kw", [("LlamaForCausalLM", {}),
                                     ("Qwen2ForCausalLM", {}),
                                     ("Qwen3ForCausalLM", dict(head_dim=32))])
def test_the_fp8_chain_is_as_close_to_bf16_as_the_plain_fp8_layers(tmp_path, arch, kw):
    """FP8 W8A8: the chain quantizes xn rather than the normed row, and e4m3's steps (2^-3)
    turn the two bf16 roundings' differences into codes a step apart now and then, so the
    chain and the plain FP8 layers differ as much as two FP8 roundings do (~7% of this
    random model's logits). What must hold: each is as far from the unquantized model's
    output (~15%) as the other."""
    path = make_tiny_model(tmp_path, arch, **TINY, **kw)
    base, base_kv = _decode(load_model(path, torch.bfloat16, "cpu"), chain=False)
    model = load_model(path, torch.bfloat16, "cpu", quant=QuantPolicy.parse("fp8"))
    assert norm_chain.chainable(model.model)
    plain, plain_kv = _decode(model, chain=False)
    got, got_kv = _decode(model, chain=True)
    assert _rel(got, plain) < 0.12
    assert _rel(got, base) < 1.2 * _rel(plain, base)
    assert (max(_rel(a, b) for a, b in zip(got_kv, base_kv))
            < 1.2 * max(_rel(a, b) for a, b in zip(plain_kv, base_kv)))


def test_the_producer_and_consumer_compose_to_add_norm_matmul():
    g = torch.Generator().manual_seed(0)
    y, res = (torch.randn(1, 256, generator=g).to(torch.bfloat16) for _ in range(2))
    nw = (1 + 0.1 * torch.randn(256, generator=g)).to(torch.bfloat16)
    w = torch.randn(96, 256, generator=g) / 16
    row, s = ref.add_norm(y, ref.AddNorm(res, nw, 1e-5))
    assert torch.equal(s, y + res)  # the residual stream rounds as the plain add
    want = torch.nn.functional.linear(rms_norm(s, nw, 1e-5).float(), w)
    got = ref.linear(row, w, None, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and _rel(got, want) < 1e-2
    # the scale is the norm's: a row scaled by 3 gives the same output
    row3, _ = ref.add_norm(3 * y, ref.AddNorm(3 * res, nw, 0.0))
    row1, _ = ref.add_norm(y, ref.AddNorm(res, nw, 0.0))
    assert _rel(ref.linear(row3, w, None, torch.float32),
                ref.linear(row1, w, None, torch.float32)) < 1e-2
    # the producer end: (NormedRow, s) after its own rounded output and bias
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    r96 = torch.randn(1, 96, generator=g).to(torch.bfloat16)
    nxt, s2 = ref.linear(row, w, b, torch.bfloat16, ref.AddNorm(r96, nw[:96], 1e-5))
    assert torch.equal(s2, ref.linear(row, w, b, torch.bfloat16) + r96)
    assert torch.equal(nxt.x, (s2.float() * nw[:96].float()).to(torch.bfloat16))
    assert nxt.amax is None  # max |xn| only where asked (for FP8 consumers)
    nxt, _ = ref.linear(row, w, b, torch.bfloat16, ref.AddNorm(r96, nw[:96], 1e-5, amax=True))
    assert torch.equal(nxt.amax, nxt.x.abs().amax().float().reshape(1))


def test_the_fp8_consumer_quantizes_xn_as_well_as_the_normed_row():
    """FP8 W8A8 after a carried norm quantizes xn (the norm's scale cancels in x / amax):
    as close to the exact float32 product as W8A8 on the plain norm's row; and the
    reference's producer end is the plain product's."""
    from tandem.kernels.reference import quant
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(1, 4096, generator=g) * 3).to(torch.bfloat16)
    nw = (1 + 0.1 * torch.randn(4096, generator=g)).to(torch.bfloat16)
    wq, ws = quant.quantize_fp8(torch.randn(192, 4096, generator=g) / 64)
    row, _ = ref.add_norm(torch.zeros_like(s), ref.AddNorm(s, nw, 1e-5))
    got = ref.fp8_linear(row, wq, ws, None, torch.bfloat16)
    want = quant.fp8_linear(rms_norm(s, nw, 1e-5), wq, ws)
    exact = torch.nn.functional.linear(
        s.float() * torch.rsqrt(s.float().pow(2).mean() + 1e-5) * nw.float(),
        wq.float() * ws[:, None])
    assert got.dtype == torch.bfloat16 and _rel(got, want) < 4e-2
    assert not torch.equal(got, want)  # xn itself was quantized, not the normed row
    assert _rel(got, exact) < 1.2 * _rel(want, exact)
    r192 = torch.randn(1, 192, generator=g).to(torch.bfloat16)
    nxt, s2 = ref.fp8_linear(s, wq, ws, None, torch.bfloat16,
                             ref.AddNorm(r192, nw[:192], 1e-5))
    assert torch.equal(s2, quant.fp8_linear(s, wq, ws) + r192)


def test_when_the_chain_applies(tmp_path, monkeypatch):
    path = make_tiny_model(tmp_path, "LlamaForCausalLM", **TINY)
    one = torch.tensor([5])
    bf16 = load_model(path, torch.bfloat16, "cpu")
    assert norm_chain.chainable(bf16.model)
    assert not norm_chain.applies(bf16.model, one)  # CPU: the plain layers
    assert norm_chain._survey(bf16.model) == (True, False)  # by default: quantized only
    int8 = load_model(path, torch.bfloat16, "cpu", quant=QuantPolicy.parse("int8"))
    assert norm_chain._survey(int8.model) == (True, True)
    fp8 = load_model(path, torch.bfloat16, "cpu", quant=QuantPolicy.parse("fp8"))
    assert norm_chain._survey(fp8.model) == (True, True)  # W8A8 carries norms too
    # TANDEM_FP8_DECODE=dot: the plain layers (the carried GEMV is the cast kernel)
    monkeypatch.setenv("TANDEM_FP8_DECODE", "dot")
    dot = load_model(path, torch.bfloat16, "cpu", quant=QuantPolicy.parse("fp8"))
    assert not norm_chain.chainable(dot.model)
    monkeypatch.delenv("TANDEM_FP8_DECODE")
    # producers leave max |xn| for FP8 consumers only (a second reduction in each program)
    res = torch.zeros(1, TINY["hidden_size"], dtype=torch.bfloat16)
    for m, want in ((fp8, True), (int8, False)):
        layer = m.model.layers[0]
        assert norm_chain._add_norm(res, layer.post_attention_layernorm,
                                    layer.mlp.gate_up_proj).amax is want
    # float32 on the CPU (oneDNN) and fp8 weight-only: not carried
    assert not norm_chain.chainable(load_model(path, torch.float32, "cpu").model)
    m = load_model(path, torch.bfloat16, "cpu", quant=QuantPolicy.parse("fp8_weight_only"))
    assert not norm_chain.chainable(m.model)
    moe = load_model(make_tiny_model(tmp_path / "moe", "MixtralForCausalLM"), torch.bfloat16,
                     "cpu")
    assert not norm_chain.chainable(moe.model)


def test_the_switch(monkeypatch):
    from tandem import envs
    for value, mode in [(None, "quantized"), ("0", "off"), ("all", "all"), ("1", "all"),
                        ("Quantized", "quantized")]:
        if value is None:
            monkeypatch.delenv("TANDEM_NORM_CHAIN", raising=False)
        else:
            monkeypatch.setenv("TANDEM_NORM_CHAIN", value)
        assert envs.norm_chain_mode() == mode
    monkeypatch.setenv("TANDEM_NORM_CHAIN", "yes")
    with pytest.raises(ValueError, match="TANDEM_NORM_CHAIN"):
        envs.norm_chain_mode()
