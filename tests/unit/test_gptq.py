"""GPTQ (tandem/quantization/gptq.py) and `tandem quant gptq` (calibrate.py): the algorithm
against round to nearest on correlated inputs, its exact reduction to round to nearest when
the inputs are uncorrelated, and the checkpoint it writes, read back by tandem, by the
compressed-tensors library's own decompressor and, through transformers, token for token."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from tandem import LLM, SamplingParams
from tandem.cli import main
from tandem.kernels.reference import quant
from tandem.quantization.gptq import gptq_int4
from tests.ct_library import library_weights
from tests.model_factory import make_tiny_model

SIZES = dict(max_model_len=128, num_kv_blocks=64, block_size=4)
PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300, 400, 12, 13, 14], list(range(30, 60))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _correlated_inputs(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, k, generator=g) @ (torch.randn(k, k, generator=g) / k ** 0.5)
    x[:, :5] *= 10.0  # a few loud channels, as real activations have
    return x + 0.1 * torch.randn(2048, k, generator=g)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gptq_moves_the_output_less_than_round_to_nearest(symmetric):
    g = torch.Generator().manual_seed(0)
    w = 0.05 * torch.randn(96, 256, generator=g)
    x = _correlated_inputs(256, 1)
    packed, scales, zeros = gptq_int4(w, x.t() @ x, 128, symmetric)
    assert packed.shape == (96, 128) and scales.shape == (96, 2)
    assert (zeros is None) == symmetric
    ref = x @ w.t()

    def output_error(p, s, z) -> float:
        return ((x @ quant.dequantize_int4(p, s, z, 128).t() - ref).norm() / ref.norm()).item()

    rtn = output_error(*quant.quantize_int4(w, 128, symmetric))
    assert output_error(packed, scales, zeros) < 0.6 * rtn


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_gptq_is_round_to_nearest_when_inputs_are_uncorrelated(symmetric):
    """H = c I: no error to pass on, equal importance: exactly quantize_int4's choice."""
    w = torch.randn(40, 256, generator=torch.Generator().manual_seed(2))
    got = gptq_int4(w, 3.0 * torch.eye(256), 128, symmetric)
    want = quant.quantize_int4(w, 128, symmetric)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)


def test_gptq_dead_inputs_scale_dtype_and_errors():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(3))
    x = _correlated_inputs(256, 4)
    x[:, 7] = 0.0  # an input that never fires
    packed, scales, zeros = gptq_int4(w, x.t() @ x, 128, scale_dtype=torch.bfloat16)
    assert torch.equal(scales, scales.to(torch.bfloat16).float())  # stored in bf16: exact
    assert (quant.dequantize_int4(packed, scales, zeros, 128)[:, 7] == 0).all()
    with pytest.raises(ValueError, match="multiple of the group size"):
        gptq_int4(torch.randn(4, 100), torch.eye(100))
    with pytest.raises(ValueError, match="hessian"):
        gptq_int4(w, torch.eye(128))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_int4_clip_search_never_loses_to_min_max(symmetric):
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(5))
    w[::7, 3] *= 8.0  # outliers, where clipping pays

    def group_errors(search: bool) -> torch.Tensor:
        p, s, z = quant.quantize_int4(w, 128, symmetric, search=search)
        d = quant.dequantize_int4(p, s, z, 128)
        return (d - w).square().reshape(64, 4, 128).sum(-1)

    searched, plain = group_errors(True), group_errors(False)
    assert (searched <= plain + 1e-6).all() and searched.sum() < 0.95 * plain.sum()
    # still round to nearest: every unclamped code is the nearest level of its scale
    p, s, z = quant.quantize_int4(w, 128, symmetric)
    q = torch.stack([p & 0xF, p >> 4], 2).reshape(64, 512).float()
    offset = 8.0 if z is None else z.float().repeat_interleave(128, 1)
    exact = w / s.repeat_interleave(128, 1) + offset
    inside = (exact > -0.5) & (exact < 15.5)
    assert ((q - exact).abs()[inside] <= 0.5 + 1e-4).all()


def _calibration_files(tmp_path) -> str:
    d = tmp_path / "calib"
    d.mkdir()
    g = torch.Generator().manual_seed(6)
    for i in range(3):  # the tiny tokenizer spells out whatever bytes it gets
        words = torch.randint(0, 26, (400,), generator=g)
        (d / f"f{i}.py").write_text(" ".join(chr(97 + int(c)) * (1 + int(c) % 3)
                                             for c in words))
    return str(d)


@pytest.mark.parametrize("symmetric,lm_head", [(True, True), (False, False)],
                         ids=["sym-with-head", "asym"])
def test_gptq_checkpoint_loads_in_tandem_the_library_and_transformers(tmp_path, symmetric,
                                                                      lm_head):
    pytest.importorskip("compressed_tensors")
    src = make_tiny_model(tmp_path / "src", tie_word_embeddings=True, hidden_size=128,
                          intermediate_size=256, num_heads=4, num_kv_heads=2)
    out = str(tmp_path / "gptq")
    argv = ["quant", "gptq", "--model", src, "--out", out, "--window", "128",
            "--max-tokens", "1024", "--no-progress", _calibration_files(tmp_path)]
    assert main(argv + (["--lm-head"] if lm_head else [])
                + ([] if symmetric else ["--asymmetric"])) == 0
    with open(f"{out}/config.json") as f:
        config = json.load(f)
    qc = config["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["symmetric"] is symmetric
    assert qc["ignore"] == ([] if lm_head else ["lm_head"])
    assert config["tie_word_embeddings"] is (not lm_head)  # a quantized head is its own

    from compressed_tensors.quantization import QuantizationArgs
    lib = library_weights(out, QuantizationArgs(num_bits=4, type="int", strategy="group",
                                                group_size=128, symmetric=symmetric))
    assert len(lib) == 2 * 7 + lm_head  # q k v o gate up down a layer (+ the head)
    llm = LLM(out, **SIZES)  # no flag: the checkpoint says how
    model = llm.engine.runner.model
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
             "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    rtn_differs = False
    stored = load_file(f"{src}/model.safetensors")
    for i, layer in enumerate(model.model.layers):
        for module in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                       layer.mlp.gate_up_proj, layer.mlp.down_proj):
            parent, leaf = module.prefix.rsplit(".", 1)
            want = torch.cat([lib[f"{parent}.{p}"] for p in fused[leaf]]).float()
            got = quant.dequantize_int4(module.qweight, module.scales, module.zeros, 128)
            assert torch.equal(got, want), module.prefix  # stored and loaded losslessly
            original = torch.cat([stored[f"{parent}.{p}.weight"] for p in fused[leaf]])
            rtn_differs |= not torch.equal(got, quant.dequantize_int4(  # calibrated
                *quant.quantize_int4(original, 128, symmetric), 128))
    assert rtn_differs
    if lm_head:
        head = model.lm_head
        assert torch.equal(quant.dequantize_int4(head.qweight, head.scales, head.zeros, 128),
                           lib["lm_head"].float())
    else:
        assert not hasattr(model.lm_head, "qweight")

    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    for name, module in hf.named_modules():
        if name in lib and name != "lm_head":
            module.weight.data = lib[name].float()
    if lm_head:  # its own weight, not the embedding's
        hf.lm_head.weight = nn.Parameter(lib["lm_head"].float(), requires_grad=False)
    hf.generation_config.eos_token_id = None
    for p, tokens in zip(PROMPTS, got):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                          pad_token_id=0)[0, len(p):].tolist()
        assert tokens == ref
    with pytest.raises(ValueError, match="already quantized"):
        LLM(out, quantization="int8", **SIZES)
    if lm_head:  # a quantized head has tensors of its own: it cannot be the embedding
        config["tie_word_embeddings"] = True
        with open(f"{out}/config.json", "w") as f:
            json.dump(config, f)
        with pytest.raises(ValueError, match="tie_word_embeddings false"):
            LLM(out, **SIZES)


def test_gptq_refuses_what_it_cannot_do(tmp_path, capsys):
    calib = _calibration_files(tmp_path)
    moe = make_tiny_model(tmp_path / "moe", "MixtralForCausalLM", hidden_size=128,
                          intermediate_size=256, moe={})
    src = make_tiny_model(tmp_path / "src", hidden_size=128, intermediate_size=256)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.py").write_text("x")
    for model, out, files, message in (
            (moe, tmp_path / "o", calib, "dense models"),
            (src, src, calib, "is the model directory"),
            (src, tmp_path / "o", str(empty), "at least 256"),
            (src, tmp_path / "o", str(tmp_path / "nowhere"), "no files")):
        assert main(["quant", "gptq", "--model", model, "--out", str(out), "--window",
                     "128", "--max-tokens", "1024", "--no-progress", files]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written for a refused run


def test_calibration_batches_windows_without_changing_the_inputs(tmp_path):
    """Several windows in one prefill (separate sequences) give the same H as one at a
    time, for a layer deep enough that attention has mixed positions."""
    from tandem.models.loader import load_model
    from tandem.quantization.calibrate import _input_hessian, calibration_windows
    src = make_tiny_model(tmp_path / "src", hidden_size=128, intermediate_size=256)
    calib = _calibration_files(tmp_path)
    windows = calibration_windows(src, [f"{calib}/f{i}.py" for i in range(3)], 100, 700)
    assert [len(w) for w in windows] == [100] * 7  # cut at 100, 700 tokens in all
    model = load_model(src, torch.float32, torch.device("cpu"))
    module = dict(model.named_modules())["model.layers.1.mlp.down_proj"]
    one = _input_hessian(model, module, windows, batch=1)
    many = _input_hessian(model, module, windows, batch=4)
    torch.testing.assert_close(many, one, rtol=1e-4, atol=1e-4 * one.abs().max().item())
