"""`tandem quant sensitivity` end to end on a tiny model: the map's table, heatmap and
JSON line, a policy within its bit budget that the engine then serves with, and the
policy builder's choices on hand-made measurements. Also the FP8 attention emulation the
map's attention-computation probes run (fast: random inputs, no model)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.kernels import get_attention_backend, kv_cache_shape
from tandem.kernels.reference import paged_attention, write_kv
from tandem.layers.attention import Attention
from tandem.quantization.policy import QuantPolicy
from tandem.quantization.sensitivity import Part, Probe, build_policy
from tests.model_factory import make_attn_metadata, make_tiny_model


@pytest.mark.slow
def test_sensitivity_command_writes_map_policy_and_json(tmp_path):
    path = make_tiny_model(tmp_path / "m", "LlamaForCausalLM", hidden_size=128,
                           intermediate_size=256, num_layers=2)
    text = tmp_path / "held_out.py"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 40)
    out = subprocess.run(
        [sys.executable, "-m", "tandem", "quant", "sensitivity", str(text), "--model", path,
         "--methods", "int4,int8,fp8", "--max-tokens", "256", "--window", "128",
         "--target-bits", "6", "--policy-out", str(tmp_path / "p.json"),
         "--heatmap", str(tmp_path / "map.png"), "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("part") and any(l.startswith("lm_head") for l in lines)
    record = json.loads(lines[-1])
    assert record["benchmark"] == "quant_sensitivity" and record["tokens"] == 256
    # 2 layers x (attn, mlp) + lm_head, each x 3 methods, + the fp8 weight-only probes
    assert len(record["probes"]) == 5 * 3 + 5
    for p in record["probes"]:
        assert p["kl"] >= 0 and 0 <= p["top1"] <= 1
    by = {(p["part"], p["method"]): p for p in record["probes"]}
    assert by[("layer 0 mlp", "int4")]["kl"] > by[("layer 0 mlp", "int8")]["kl"]
    assert set(record["activation_kl"]) == {"layer 0 attn", "layer 0 mlp", "layer 1 attn",
                                            "layer 1 mlp", "lm_head"}
    assert set(record["not_chosen"]) == {"fp8_weight_only", "fp8_kv", "fp8_attn"}
    assert [p["part"] for p in record["kv_probes"]] == ["layer 0 kv", "layer 1 kv"]
    assert all(p["kl"] > 0 for p in record["kv_probes"])  # FP8 K/V changes something
    assert [p["part"] for p in record["attn_probes"]] == ["layer 0 attn_compute",
                                                          "layer 1 attn_compute"]
    for p in record["attn_probes"]:  # FP8 attention math changes something, finitely
        assert p["method"] == "fp8_attn" and math.isfinite(p["kl"]) and p["kl"] > 0
        assert math.isfinite(p["bpb_increase"]) and 0 <= p["top1"] <= 1
    assert any(l.startswith("layer 1 attn_compute") for l in lines)
    for row in record["per_layer_8bit"].values():  # every 8-bit column measured
        assert all(v is not None and v >= 0 for k, v in row.items() if k != "fp8 A")
    chosen = json.loads((tmp_path / "p.json").read_text())["layers"].values()
    assert not set(chosen) & {"fp8_kv", "fp8_attn", "fp8_weight_only"}
    assert (tmp_path / "map.png").stat().st_size > 1000
    assert record["predicted"]["avg_bits"] <= 6 + 1e-9
    # The policy file is a quantization the engine serves with.
    policy = QuantPolicy.parse(str(tmp_path / "p.json"))
    assert policy.method_for("model.layers.1.mlp.down_proj") in ("int4", "int8", "fp8", None)
    llm = LLM(path, quantization=str(tmp_path / "p.json"), max_model_len=128,
              num_kv_blocks=32)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4,
                                                   ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_build_policy_spends_bits_where_they_buy_most():
    parts = [Part("a", "a.*", 100, 0, "attn"), Part("b", "b.*", 100, 0, "mlp")]
    probes = [Probe("a", "int4", 4.0, 0.10, 0.02, 0.9), Probe("a", "int8", 8.0, 0.01, 0.0, 1),
              Probe("b", "int4", 4.0, 0.01, 0.001, 0.99), Probe("b", "int8", 8.0, 0.0, 0.0, 1)]
    # 6 bits on average: one part can go to int8; "a" gains far more from it.
    policy, predicted = build_policy(parts, probes, 16.0, target_bits=6.0)
    assert dict(policy.rules) == {"a.*": "int8", "b.*": "int4"}
    assert predicted["avg_bits"] == pytest.approx(6.0)
    policy, _ = build_policy(parts, probes, 16.0, target_bits=4.0)
    assert dict(policy.rules) == {"a.*": "int4", "b.*": "int4"}
    # A quality budget instead: upgrade until the predicted increase fits.
    policy, predicted = build_policy(parts, probes, 16.0, max_bpb_increase=0.005)
    assert dict(policy.rules)["a.*"] != "int4" and predicted["bpb_increase"] <= 0.005
    with pytest.raises(ValueError, match="exactly one"):
        build_policy(parts, probes, 16.0)


def _batch(seqs: list[tuple[int, int]], block_size: int = 8, heads: int = 8,
           kv_heads: int = 2, head_dim: int = 64):
    """Random q and a cache holding random K/V for (query_len, seq_len) sequences: decodes,
    a chunk after a cached prefix, a fresh prefill."""
    rng = random.Random(0)
    torch.manual_seed(0)
    need = [-(-s // block_size) for _, s in seqs]
    pool = list(range(sum(need) + 2))
    rng.shuffle(pool)
    tables = [[pool.pop() for _ in range(n)] for n in need]
    meta = make_attn_metadata([q for q, _ in seqs], [s for _, s in seqs], tables, block_size)
    cache = torch.full(kv_cache_shape(sum(need) + 2, block_size, kv_heads, head_dim), 1e4)
    key, value = (torch.randn(meta.num_tokens, kv_heads, head_dim) for _ in range(2))
    # every slot a sequence reaches holds real K/V (the 1e4 fill is stale padding)
    for i, (_, s_len) in enumerate(seqs):
        slots = torch.tensor([tables[i][p // block_size] * block_size + p % block_size
                              for p in range(s_len)])
        write_kv(torch.randn(s_len, kv_heads, head_dim), torch.randn(s_len, kv_heads,
                                                                     head_dim), cache, slots)
    write_kv(key, value, cache, meta.slot_mapping)
    return torch.randn(meta.num_tokens, heads, head_dim), key, value, cache, meta


SEQS = [(1, 13), (1, 30), (5, 21), (9, 9)]  # two decodes, a chunk, a fresh prefill


def test_fp8_attention_is_close_but_not_exact():
    q, key, value, cache, meta = _batch(SEQS)
    exact = paged_attention(q, cache, meta, 0.125, key, value)
    fp8 = paged_attention(q, cache, meta, 0.125, key, value, fp8_attention=True)
    assert fp8.shape == exact.shape and torch.isfinite(fp8).all()
    err = (fp8 - exact).norm(dim=-1) / exact.norm(dim=-1)  # (num_tokens, num_heads)
    # e4m3 keeps 3 mantissa bits (2^-4 relative rounding): a few percent, never zero
    assert (err > 1e-4).all() and err.mean() < 0.08 and err.max() < 0.3
    off = paged_attention(q, cache, meta, 0.125, key, value, fp8_attention=False)
    torch.testing.assert_close(off, exact, rtol=0, atol=0)


def test_attention_layer_knob_routes_every_backend_through_the_emulation():
    q, key, value, cache, meta = _batch(SEQS)
    expected_fp8 = paged_attention(q, cache.clone(), meta, 0.125, key, value,
                                   fp8_attention=True)
    for backend in ("torch", "cpu"):  # "cpu" would take its C decode kernel: bypassed
        layer = Attention(8, 64, 0.125, 2, get_attention_backend(backend))
        layer.kv_cache = cache.clone()
        exact = layer(q.flatten(1), key.flatten(1), value.flatten(1), meta)
        layer.fp8_attention = True
        fp8 = layer(q.flatten(1), key.flatten(1), value.flatten(1), meta)
        torch.testing.assert_close(fp8, expected_fp8.flatten(1))
        assert (fp8 - exact).abs().max() > 1e-3
        layer.fp8_attention = False
        torch.testing.assert_close(layer(q.flatten(1), key.flatten(1), value.flatten(1),
                                         meta), exact, rtol=0, atol=0)
