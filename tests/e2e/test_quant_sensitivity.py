"""`tandem quant sensitivity` end to end on a tiny model: the map's table, heatmap and
JSON line, a policy within its bit budget that the engine then serves with, and the
policy builder's choices on hand-made measurements."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tandem import LLM, SamplingParams
from tandem.quantization.policy import QuantPolicy
from tandem.quantization.sensitivity import Part, Probe, build_policy
from tests.model_factory import make_tiny_model

pytestmark = pytest.mark.slow


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
    assert "attention" in record["not_measured"]
    assert [p["part"] for p in record["kv_probes"]] == ["layer 0 kv", "layer 1 kv"]
    assert all(p["kl"] > 0 for p in record["kv_probes"])  # FP8 K/V changes something
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
