"""Asymmetric and per-channel pack-quantized INT4 and FP8 KV-cache scales from
compressed-tensors checkpoints written by the `compressed-tensors` library itself.

- INT4 W4A16 with zero points (`symmetric: false`): the library picks scales and zero
  points (its own `calculate_qparams`) and packs them; tandem must dequantize to exactly
  the weights the library's own decompressor gives back, and generate what transformers
  generates on those weights.
- `kv_cache_scheme` (FP8, one static scale per tensor) with each layer's k_scale and
  v_scale: the KV cache becomes FP8 under kv_cache_dtype auto, with exactly those scales,
  and generates what kv_cache_dtype=fp8 with the same scales set by hand generates.

transformers 5 renamed the attention's `past_key_values` argument, so the library's
`apply_quantization_config` no longer finds attention modules to hang k_scale/v_scale on.
The test registers them the way its `initialize_qparams` does (a (1,) parameter on each
self_attn) and sets the scheme on the library's `QuantizationConfig`.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tandem import LLM, SamplingParams
from tandem.kernels.reference.quant import dequantize_int4
from tests.ct_library import library_weights
from tests.model_factory import make_tiny_model

ct = pytest.importorskip("compressed_tensors")

SIZES = dict(max_model_len=128, num_kv_blocks=64, block_size=4)
PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300, 400, 12, 13, 14], list(range(30, 60))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1)
GROUP = 128


def _int4_asym(channel: bool = False, symmetric: bool = False):
    from compressed_tensors.quantization import QuantizationArgs
    if channel:  # one scale (and zero point) a row
        return QuantizationArgs(num_bits=4, type="int", strategy="channel",
                                symmetric=symmetric)
    return QuantizationArgs(num_bits=4, type="int", strategy="group", group_size=GROUP,
                            symmetric=symmetric)


def _fp8_kv():
    from compressed_tensors.quantization import QuantizationArgs
    return QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False,
                            symmetric=True)


def _src(tmp_path, hidden_size: int = 128) -> str:
    return make_tiny_model(tmp_path / "src", "Qwen2ForCausalLM", hidden_size=hidden_size,
                           intermediate_size=2 * hidden_size)


def _write(src: str, out: str, int4_asym: bool, kv: bool,
           args=None) -> list[tuple[float, float]]:
    """A compressed-tensors checkpoint of `src`: pack-quantized asymmetric INT4 linears
    (or INT4 as `args` say) and/or an FP8 kv_cache_scheme. Returns the K/V scales written
    (per layer)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    scales = []
    if kv:  # per-tensor amax / 448 of what k_proj and v_proj give on a calibration prompt
        seen: dict[str, float] = {}
        hooks = [m.register_forward_hook(
            lambda mod, inp, o, name=name: seen.__setitem__(name, o.abs().amax().item()))
            for name, m in model.named_modules() if name.endswith(("k_proj", "v_proj"))]
        with torch.no_grad():
            model(torch.arange(3, 67).unsqueeze(0))
        for h in hooks:
            h.remove()
        for name, attn in model.named_modules():
            if name.endswith("self_attn"):
                pair = []
                for kv_name in ("k", "v"):
                    amax = torch.tensor([seen[f"{name}.{kv_name}_proj"]])
                    scale, _ = calculate_qparams(-amax, amax, _fp8_kv())
                    attn.register_parameter(f"{kv_name}_scale",
                                            torch.nn.Parameter(scale, requires_grad=False))
                    pair.append(scale.item())
                scales.append(tuple(pair))
    if int4_asym or args is not None:
        args = args or _int4_asym()
        group = GROUP if args.strategy == "group" else None  # None: a whole row
        apply_quantization_config(model, QuantizationConfig(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
            ignore=["lm_head"], format="pack-quantized"))
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                rows = module.weight.shape[0]
                w = module.weight.data.reshape(rows, -1, group or module.weight.shape[1])
                scale, zp = calculate_qparams(w.amin(2), w.amax(2), args)
                module.weight_scale.data = scale.reshape(module.weight_scale.shape)
                if hasattr(module, "weight_zero_point"):
                    module.weight_zero_point.data = zp.reshape(
                        module.weight_zero_point.shape)
                module.quantization_status = QuantizationStatus.FROZEN
        compressor = ModelCompressor.from_pretrained_model(
            model, quantization_format="pack-quantized")
        compressor.compress_model(model)
    else:
        compressor = ModelCompressor(QuantizationConfig(config_groups={}))
    if kv:
        compressor.quantization_config.kv_cache_scheme = _fp8_kv()
    model.save_pretrained(out)
    compressor.update_config(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with open(f"{src}/{name}") as f, open(f"{out}/{name}", "w") as g:
            g.write(f.read())
    return scales


def _outputs(llm: LLM) -> list[tuple[list[int], list]]:
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs)
            for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _library_weights(out: str, args=None) -> dict[str, torch.Tensor]:
    """module name -> the float weight the library's own decompressor gives back."""
    return library_weights(out, args or _int4_asym())


def _assert_generates_like_transformers(llm: LLM, src: str,
                                        lib: dict[str, torch.Tensor]) -> None:
    """llm's greedy tokens equal transformers' on src with the library's weights in."""
    got = _outputs(llm)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for name, module in hf.named_modules():
        if name in lib:
            module.weight.data = lib[name].float()
    hf.generation_config.eos_token_id = None
    for p, (tokens, _) in zip(PROMPTS, got):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                          pad_token_id=0)[0, len(p):].tolist()
        assert tokens == ref


def test_zero_points_unpack_as_the_library_packs_them():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from tandem.quantization.compressed_tensors import unpack_zero_points
    g = torch.Generator().manual_seed(0)
    for rows, groups in ((24, 3), (64, 1), (20, 2)):
        zp = torch.randint(-8, 8, (rows, groups), generator=g, dtype=torch.int8)
        packed = pack_to_int32(zp, 4, packed_dim=0)  # down the output dimension
        assert packed.shape == (-(-rows // 8), groups) and packed.dtype == torch.int32
        got = unpack_zero_points(packed)
        assert got.dtype == torch.uint8 and got.shape == (8 * packed.shape[0], groups)
        assert torch.equal(got[:rows].int(), zp.int() + 8)  # 20 rows: 4 of padding after


def test_asymmetric_int4_checkpoint_matches_the_library_and_transformers(tmp_path):
    src, out = _src(tmp_path), str(tmp_path / "ckpt")
    _write(src, out, int4_asym=True, kv=False)
    with open(f"{out}/config.json") as f:
        qc = json.load(f)["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is False
    lib = _library_weights(out)
    llm = LLM(out, **SIZES)  # no flag: the checkpoint says how
    layers = llm.engine.runner.model.model.layers
    zeros_seen = set()
    for i, layer in enumerate(layers):
        pre = f"model.layers.{i}"
        for module, parts in (
                (layer.self_attn.qkv_proj, ("self_attn.q_proj", "self_attn.k_proj",
                                            "self_attn.v_proj")),
                (layer.self_attn.o_proj, ("self_attn.o_proj",)),
                (layer.mlp.gate_up_proj, ("mlp.gate_proj", "mlp.up_proj")),
                (layer.mlp.down_proj, ("mlp.down_proj",))):
            assert module.zeros is not None and module.zeros.dtype == torch.uint8
            zeros_seen |= set(module.zeros.unique().tolist())
            got = dequantize_int4(module.qweight, module.scales, module.zeros, GROUP)
            want = torch.cat([lib[f"{pre}.{p}"] for p in parts])
            assert torch.equal(got, want.float()), f"{pre}: {parts}"  # lossless
    assert len(zeros_seen) > 3  # real zero points, not a symmetric grid in disguise
    _assert_generates_like_transformers(llm, src, lib)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_per_channel_int4_checkpoint_matches_the_library_and_transformers(tmp_path,
                                                                          symmetric):
    """INT4 W4A16 with one scale (and zero point) a row, strategy "channel": loads without
    flags, dequantizes to exactly the library's weights (its row scale repeated over the
    kernels' groups), and generates what transformers generates on those weights."""
    args = _int4_asym(channel=True, symmetric=symmetric)
    src, out = _src(tmp_path, hidden_size=96), str(tmp_path / "ckpt")  # K = 96: groups of 32
    _write(src, out, int4_asym=False, kv=False, args=args)
    with open(f"{out}/config.json") as f:
        qc = json.load(f)["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    lib = _library_weights(out, args)
    llm = LLM(out, **SIZES)
    layer = llm.engine.runner.model.model.layers[0]
    for module, parts, group in (
            (layer.self_attn.qkv_proj, ("self_attn.q_proj", "self_attn.k_proj",
                                        "self_attn.v_proj"), 32),  # K = 96
            (layer.mlp.down_proj, ("mlp.down_proj",), 64)):  # K = 192
        assert module.method.name == f"ct_int4{'' if symmetric else '_asym'}_ch"
        assert (module.zeros is None) == symmetric
        g = module.method.group_size  # each layer: the largest kernel group dividing its K
        assert g == group
        assert torch.equal(module.scales, module.scales[:, :1].expand_as(module.scales))
        got = dequantize_int4(module.qweight, module.scales, module.zeros, g)
        want = torch.cat([lib[f"model.layers.0.{p}"] for p in parts])
        assert torch.equal(got, want.float()), parts  # lossless
    _assert_generates_like_transformers(llm, src, lib)


@pytest.mark.parametrize("int4_asym", [False, True], ids=["kv-only", "w4a16-asym+kv"])
def test_kv_cache_scheme_uses_the_checkpoint_scales(tmp_path, int4_asym):
    src = _src(tmp_path)
    out, plain = str(tmp_path / "ckpt"), str(tmp_path / "plain")
    scales = _write(src, out, int4_asym, kv=True)
    if int4_asym:  # the same weights without the KV scheme: the reference's model
        _write(src, plain, int4_asym, kv=False)
    else:
        plain = src
    with open(f"{out}/config.json") as f:
        assert json.load(f)["quantization_config"]["kv_cache_scheme"]["num_bits"] == 8
    assert len(scales) == 2 and all(s != 1.0 for pair in scales for s in pair)

    llm = LLM(out, **SIZES)  # kv_cache_dtype "auto": the checkpoint's FP8 and scales
    runner = llm.engine.runner
    assert [s.dtype for s in runner.kv_spec] == [torch.float8_e4m3fn] * 2
    assert [s.kv_scale for s in runner.kv_spec] == scales
    assert [a.kv_scale for a in runner.model.attention_layers()] == scales
    assert all(c.dtype == torch.float8_e4m3fn for c in runner.kv_caches)
    got = _outputs(llm)

    ref = LLM(plain, kv_cache_dtype="fp8", **SIZES)
    ref_runner = ref.engine.runner
    for i, layer in enumerate(ref_runner.model.attention_layers()):  # by hand
        layer.kv_scale = scales[i]
        ref_runner.kv_spec[i] = dataclasses.replace(ref_runner.kv_spec[i],
                                                    kv_scale=scales[i])
    assert got == _outputs(ref)  # tokens and logprobs
    unit = LLM(plain, kv_cache_dtype="fp8", **SIZES)  # scales 1.0: the scales matter
    assert [lp for _, lp in got] != [lp for _, lp in _outputs(unit)]

    # explicit fp8 takes the checkpoint's scales too, and they win over calibration
    both = LLM(out, kv_cache_dtype="fp8", calculate_kv_scales=True, **SIZES)
    assert [a.kv_scale for a in both.engine.runner.model.attention_layers()] == scales
    skip = LLM(out, kv_cache_dtype_skip_layers="0", **SIZES)
    assert [s.dtype for s in skip.engine.runner.kv_spec] == [torch.float32,
                                                             torch.float8_e4m3fn]
    assert skip.engine.runner.kv_spec[1].kv_scale == scales[1]

    # the model dtype by name (vLLM's kv_cache_dtype="bfloat16" and kin) keeps the cache
    # unquantized: what the same weights without the KV scheme generate
    kept = LLM(out, kv_cache_dtype="float32", **SIZES)
    assert all(c.dtype == torch.float32 for c in kept.engine.runner.kv_caches)
    assert _outputs(kept) == _outputs(LLM(plain, **SIZES))
    with pytest.raises(ValueError, match="kv_cache_dtype bfloat16 is not the model dtype"):
        LLM(out, kv_cache_dtype="bfloat16", **SIZES)


def test_kv_cache_scheme_alone_leaves_the_weights_to_the_user(tmp_path):
    src, out = _src(tmp_path), str(tmp_path / "ckpt")
    scales = _write(src, out, int4_asym=False, kv=True)
    llm = LLM(out, quantization="int8", **SIZES)  # the weights are not quantized yet
    runner = llm.engine.runner
    assert runner.model.model.layers[0].self_attn.qkv_proj.qweight.dtype == torch.int8
    assert [s.kv_scale for s in runner.kv_spec] == scales
    dummy = LLM(out, load_format="dummy", **SIZES)  # no tensors to read: FP8, scales 1.0
    assert [s.kv_scale for s in dummy.engine.runner.kv_spec] == [(1.0, 1.0)] * 2


def _config(kv: dict) -> dict:
    return {"quantization_config": {
        "quant_method": "compressed-tensors", "kv_cache_scheme": kv,
        "config_groups": {}, "ignore": ["lm_head"]}}


@pytest.mark.parametrize("change,match", [
    ({"strategy": "channel"}, r"kv_cache_scheme.strategy 'channel'"),
    ({"strategy": "attn_head"}, r"kv_cache_scheme.strategy 'attn_head'"),
    ({"num_bits": 4}, r"kv_cache_scheme: type 'float', num_bits 4"),
    ({"type": "int"}, r"kv_cache_scheme: type 'int', num_bits 8"),
    ({"dynamic": True}, r"kv_cache_scheme.dynamic"),
    ({"symmetric": False}, r"kv_cache_scheme.symmetric"),
])
def test_unsupported_kv_cache_schemes_are_refused(change, match):
    from tandem.quantization.compressed_tensors import policy_from_config
    kv = {**_fp8_kv().model_dump(), **change}
    with pytest.raises(ValueError, match=match):
        policy_from_config(_config(kv))


def test_bad_kv_scale_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    src, out = _src(tmp_path), str(tmp_path / "ckpt")
    _write(src, out, int4_asym=False, kv=True)
    with open(f"{out}/config.json") as f:
        config = json.load(f)
    config["quantization_config"]["kv_cache_scheme"]["strategy"] = "attn_head"
    with open(f"{out}/config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="kv_cache_scheme.strategy 'attn_head'"):
        LLM(out, **SIZES)
    config["quantization_config"]["kv_cache_scheme"]["strategy"] = "tensor"
    with open(f"{out}/config.json", "w") as f:
        json.dump(config, f)
    path = f"{out}/model.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.self_attn.v_scale"
    tensors[name] = torch.full((2, 1, 1), 0.01)  # one per kv head: not what tandem holds
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}: shape \(2, 1, 1\)"):
        LLM(out, **SIZES)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"missing 1: \['{name}'\]"):
        LLM(out, **SIZES)
