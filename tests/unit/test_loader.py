"""tandem.models.loader: formats (single, sharded, dummy) and errors that name the problem."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.models.loader import load_model, read_hf_config
from tandem.models.registry import ARCHITECTURES, model_class_for
from tests.model_factory import make_attn_metadata, make_tiny_model


@pytest.fixture
def tiny(tmp_path) -> str:
    return make_tiny_model(tmp_path / "model", "Qwen2ForCausalLM")


def _rewrite(path: str, edit) -> None:
    """Apply edit(dict of tensors) to model.safetensors in place."""
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _logits(model, n: int = 7) -> torch.Tensor:
    for layer in model.attention_layers():
        layer.kv_cache = torch.zeros(layer.kv_cache_shape(4, 4))
    meta = make_attn_metadata([n], [n], [[2, 0, 3, 1][: -(-n // 4)]], 4)
    with torch.no_grad():
        return model.compute_logits(model(torch.arange(n) * 31 % 512, torch.arange(n), meta))


def test_loads_every_parameter_in_dtype(tiny: str) -> None:
    model = load_model(tiny, torch.bfloat16, "cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not model.training
    ref = load_file(os.path.join(tiny, "model.safetensors"))
    qkv = model.model.layers[1].self_attn.qkv_proj
    k = ref["model.layers.1.self_attn.k_proj.bias"].to(torch.bfloat16)
    assert torch.equal(qkv.bias[qkv.q_size:qkv.q_size + qkv.kv_size], k)


def test_sharded_checkpoint_loads_identically(tiny: str, tmp_path) -> None:
    tensors = load_file(os.path.join(tiny, "model.safetensors"))
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (shard_dir / name).write_text(open(os.path.join(tiny, name)).read())
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(shard_dir / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    one = load_model(tiny, torch.float32, "cpu")
    two = load_model(str(shard_dir), torch.float32, "cpu")
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(_logits(one), _logits(two), atol=0, rtol=0)


def test_missing_tensor_is_named(tiny: str) -> None:
    _rewrite(tiny, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(ValueError,
                       match=r"missing 1 tensor.*model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        load_model(tiny, torch.float32, "cpu")


def test_untied_model_without_lm_head_is_missing_it(tiny: str) -> None:
    _rewrite(tiny, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_model(tiny, torch.float32, "cpu")


def test_shape_mismatch_names_tensor_and_shapes(tiny: str) -> None:
    def edit(t):
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(100, 64)
    _rewrite(tiny, edit)
    with pytest.raises(ValueError, match=r"up_proj\.weight.*expected \(128, 64\), got \(100, 64\)"):
        load_model(tiny, torch.float32, "cpu")


def test_unexpected_tensor_errors_but_inv_freq_is_ignored(tiny: str) -> None:
    def add_inv_freq(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    _rewrite(tiny, add_inv_freq)
    load_model(tiny, torch.float32, "cpu")

    def add_junk(t):
        t["model.layers.0.self_attn.mystery.weight"] = torch.ones(8)
    _rewrite(tiny, add_junk)
    with pytest.raises(ValueError,
                       match=r"unexpected tensor 'model\.layers\.0\.self_attn\.mystery\.weight'"):
        load_model(tiny, torch.float32, "cpu")


def test_unsupported_architecture(tiny: str) -> None:
    config = read_hf_config(tiny)
    config["architectures"] = ["GPT2LMHeadModel"]
    with open(os.path.join(tiny, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel; supported: "
                                         "LlamaForCausalLM"):
        load_model(tiny, torch.float32, "cpu")
    qwen3 = {"architectures": ["Qwen3ForCausalLM"]}
    assert model_class_for(qwen3) is ARCHITECTURES["Qwen3ForCausalLM"]


def test_missing_config_and_missing_weights(tmp_path, tiny: str) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path), torch.float32, "cpu")
    os.remove(os.path.join(tiny, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no safetensors files"):
        load_model(tiny, torch.float32, "cpu")


def test_dummy_weights_need_only_config(tiny: str) -> None:
    os.remove(os.path.join(tiny, "model.safetensors"))
    model = load_model(tiny, torch.float32, "cpu", load_format="dummy", seed=3)
    again = load_model(tiny, torch.float32, "cpu", load_format="dummy", seed=3)
    logits = _logits(model)
    assert logits.shape == (7, 512) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, _logits(again), atol=0, rtol=0)
    assert torch.equal(model.model.norm.weight, torch.ones(64))


def test_bad_load_format(tiny: str) -> None:
    with pytest.raises(ValueError, match="load_format 'pt'"):
        load_model(tiny, torch.float32, "cpu", load_format="pt")
