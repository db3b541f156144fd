"""Pre-quantized compressed-tensors checkpoints, written by the `compressed-tensors` library
itself, load without flags and generate. FP8 per-channel W8A8 and pack-quantized INT4
W4A16 (group 128) checkpoints are quantized with the scales tandem's own quantizer would
choose, so the checkpoint-loaded model must equal the model tandem quantizes at load
(same buffers, same greedy tokens); the INT4 one also matches transformers running the
library's own decompression. Asymmetric INT4 and FP8 KV-cache scales:
test_ct_asym_kv_scales.py."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tandem import LLM, SamplingParams
from tandem.kernels.reference import quant
from tests.model_factory import make_tiny_model

ct = pytest.importorskip("compressed_tensors")

SIZES = dict(max_model_len=128, num_kv_blocks=64, block_size=4)
PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300, 400, 12, 13, 14], list(range(30, 60))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _write_checkpoint(src: str, out: str, fmt: str) -> None:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme, QuantizationStatus,
                                                 apply_quantization_config)
    if fmt == "float-quantized":
        scheme = dict(weights=QuantizationArgs(num_bits=8, type="float", strategy="channel"),
                      input_activations=QuantizationArgs(num_bits=8, type="float",
                                                         strategy="token", dynamic=True))
    else:
        scheme = dict(weights=QuantizationArgs(num_bits=4, type="int", strategy="group",
                                               group_size=128, symmetric=True))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], **scheme)},
        ignore=["lm_head"], format=fmt))
    for module in model.modules():
        if not hasattr(module, "weight_scale"):
            continue
        w = module.weight.data  # the scales tandem's quantizer picks (round to nearest)
        if fmt == "float-quantized":
            scale = w.abs().amax(1, keepdim=True) / 448.0
        else:
            scale = quant.quantize_int4(w, 128)[1]  # with its clip search
        module.weight_scale.data = scale.to(module.weight_scale.dtype)
        module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with open(f"{src}/{name}") as f, open(f"{out}/{name}", "w") as g:
            g.write(f.read())


@pytest.mark.parametrize("fmt,method", [("float-quantized", "fp8"), ("pack-quantized", "int4")])
def test_checkpoint_loads_as_tandem_quantizes(tmp_path, fmt, method):
    src = make_tiny_model(tmp_path / "src", "Qwen2ForCausalLM", hidden_size=128,
                          intermediate_size=256)
    out = str(tmp_path / "ckpt")
    _write_checkpoint(src, out, fmt)
    with open(f"{out}/config.json") as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "compressed-tensors"
    loaded = LLM(out, **SIZES)  # no flag: the checkpoint says how
    own = LLM(src, quantization=method, **SIZES)
    a = loaded.engine.runner.model.model.layers[1].self_attn.qkv_proj
    b = own.engine.runner.model.model.layers[1].self_attn.qkv_proj
    for buf in ("weight_q", "weight_scale") if method == "fp8" else ("qweight", "scales"):
        ta, tb = getattr(a, buf), getattr(b, buf)
        assert ta.dtype == tb.dtype and torch.equal(ta.float(), tb.float()), buf
    got = [o.outputs[0].token_ids for o in loaded.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert got == [o.outputs[0].token_ids for o in own.generate(PROMPTS, GREEDY,
                                                                 use_tqdm=False)]
    if method == "int4":  # weight-only: transformers on weights the library unpacks agrees
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
        from safetensors.torch import load_file
        stored = load_file(f"{out}/model.safetensors")
        hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        for name, module in hf.named_modules():
            if f"{name}.weight_packed" in stored:
                q = unpack_from_int32(stored[f"{name}.weight_packed"], 4,
                                      torch.Size(stored[f"{name}.weight_shape"].tolist()))
                scale = stored[f"{name}.weight_scale"].float().repeat_interleave(128, dim=1)
                module.weight.data = q.float() * scale
        hf.generation_config.eos_token_id = None
        for p, g in zip(PROMPTS, got):
            ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()
            assert g == ref
    with pytest.raises(ValueError, match="already quantized"):
        LLM(out, quantization="int8", **SIZES)


def test_unsupported_checkpoint_schemes_are_refused(tmp_path):
    from tandem.quantization.compressed_tensors import policy_from_config
    base = {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "ignore": ["lm_head"], "config_groups": {"group_0": {"targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
                        "symmetric": False}}}}
    assert policy_from_config({"quantization_config": base}).default == "ct_int4_asym_g128"
    base["config_groups"]["group_0"]["weights"]["actorder"] = "group"  # needs weight_g_idx
    with pytest.raises(ValueError, match="actorder 'group'"):
        policy_from_config({"quantization_config": base})
    del base["config_groups"]["group_0"]["weights"]["actorder"]
    base["config_groups"]["group_0"]["weights"].update(num_bits=3, symmetric=True)
    with pytest.raises(ValueError, match="not supported"):
        policy_from_config({"quantization_config": base})
    base["config_groups"]["group_0"]["weights"].update(num_bits=4)
    base["ignore"] = []  # the LM head is quantized too (test_gptq.py loads one)
    policy = policy_from_config({"quantization_config": base})
    assert policy.method_for("lm_head") == "ct_int4_g128"
    with pytest.raises(ValueError, match="'gptq' is not supported"):
        policy_from_config({"quantization_config": {"quant_method": "gptq"}})
