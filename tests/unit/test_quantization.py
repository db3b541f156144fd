"""Quantization on CPU: the reference quantizers' round trips and error bounds, the policy,
and greedy parity of each method against a transformers model whose weights were
quantize-dequantized the same way (so the only difference left is the kernel)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tandem import LLM, SamplingParams
from tandem.kernels.reference import quant
from tandem.quantization import QuantPolicy
from tests.model_factory import make_tiny_model


def test_int8_round_trip_and_linear():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g)
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    # round to nearest: at most half a step off per element
    assert ((quant.dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()
    x = torch.randn(5, 256, generator=g)
    ref = x @ quant.dequantize_int8(q, s).t()
    torch.testing.assert_close(quant.int8_linear(x, q, s), ref)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_round_trip_packing_and_linear(symmetric):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 512, generator=g) + (0.0 if symmetric else 0.7)
    # min-max ranges: nothing clipped, so every weight is within half a step (the clip
    # search is tested in test_gptq.py)
    packed, scale, zeros = quant.quantize_int4(w, 128, symmetric, search=False)
    assert packed.dtype == torch.uint8 and packed.shape == (32, 256)
    assert scale.shape == (32, 4) and (zeros is None) == symmetric
    deq = quant.dequantize_int4(packed, scale, zeros, 128)
    step = scale.repeat_interleave(128, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-5).all()
    # nibble order: byte j holds q[2j] (low) and q[2j+1] (high)
    q = torch.stack([packed & 0xF, packed >> 4], 2).reshape(32, 512)
    assert torch.equal(q[:, 0::2], packed & 0xF)
    x = torch.randn(3, 512, generator=g)
    torch.testing.assert_close(quant.int4_linear(x, packed, scale, zeros, 128), x @ deq.t())
    with pytest.raises(ValueError, match="multiple of the group size"):
        quant.quantize_int4(torch.randn(4, 100), 128)


def test_fp8_per_channel_and_per_token():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g)
    wq, ws = quant.quantize_fp8(w)
    assert wq.dtype == torch.float8_e4m3fn and ws.shape == (64,)
    rel = ((wq.float() * ws[:, None] - w).abs() / w.abs().clamp_min(1e-3)).median()
    assert rel < 0.04  # e4m3 keeps 3 mantissa bits
    x = torch.randn(7, 128, generator=g)
    xq, xs = quant.quantize_fp8(x)
    expected = (xq.float() * xs[:, None]) @ (wq.float() * ws[:, None]).t()
    torch.testing.assert_close(quant.fp8_linear(x, wq, ws), expected, rtol=1e-5, atol=1e-5)


def test_policy_rules_and_errors(tmp_path):
    assert QuantPolicy.parse(None) is None and QuantPolicy.parse("none") is None
    p = QuantPolicy.parse("int4")
    assert p.method_for("model.layers.3.mlp.down_proj") == "int4"
    assert p.method_for("lm_head") is None  # only when named
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"default": "int4", "layers": {
        "model.layers.0.*": "int8", "*.o_proj": "none", "lm_head": "fp8"}}))
    p = QuantPolicy.parse(str(path))
    assert p.method_for("model.layers.0.self_attn.o_proj") == "int8"  # first match wins
    assert p.method_for("model.layers.1.self_attn.o_proj") is None
    assert p.method_for("model.layers.1.mlp.gate_up_proj") == "int4"
    assert p.method_for("lm_head") == "fp8"
    with pytest.raises(ValueError, match="fp8"):
        QuantPolicy.parse("int3")
    path.write_text(json.dumps({"default": "int2"}))
    with pytest.raises(ValueError, match="'int2'"):
        QuantPolicy.parse(str(path))


def _fake_quantize_hf(hf, method: str, lm_head: bool) -> None:
    """Replace every decoder linear weight (and the LM head if asked) by its quantize-
    dequantize round trip: what tandem's kernels compute with."""
    for name, module in hf.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not (name.startswith("model.layers.") or (lm_head and name == "lm_head")):
            continue
        w = module.weight.data
        if method == "int8":
            w2 = quant.dequantize_int8(*quant.quantize_int8(w))
        elif method.startswith("int4"):
            w2 = quant.dequantize_int4(*quant.quantize_int4(w, 128, method == "int4"), 128)
        else:  # W8A8: the activations are quantized per token at run time too
            wq, ws = quant.quantize_fp8(w)
            module.forward = lambda x, wq=wq, ws=ws, b=module.bias: quant.fp8_linear(x, wq,
                                                                                      ws, b)
            continue
        module.weight.data = w2


@pytest.mark.parametrize("method", ["int8", "int4", "int4_asym", "fp8"])
def test_greedy_parity_with_quantize_dequantized_transformers(tmp_path, method):
    # q/k/v and gate/up fuse in tandem; quantization is per output row (int8, fp8) or per
    # (row, group of 128 inputs) (int4), so fusing changes nothing.
    path = make_tiny_model(tmp_path, "Qwen2ForCausalLM", hidden_size=128,
                           intermediate_size=256, num_heads=4, num_kv_heads=2)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _fake_quantize_hf(hf, method, lm_head=False)
    hf.generation_config.eos_token_id = None
    llm = LLM(path, quantization=method, max_model_len=128, num_kv_blocks=64, block_size=4)
    layer = llm.engine.runner.model.model.layers[0].mlp.down_proj
    assert type(layer.method).__name__ != "CpuPackedLinearMethod" and not hasattr(layer, "weight")
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300, 400, 12, 13, 14], list(range(30, 60))]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10,
                                                ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref
    # And the quantization changed the model: the unquantized one decodes differently.
    plain = LLM(path, max_model_len=128, num_kv_blocks=64, block_size=4).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in plain] != [o.outputs[0].token_ids for o in outs]
