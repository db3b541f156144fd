"""The benchmark's bound for a mixture of experts counts the active parameters per token,
and a decode step's weight bytes grow with the experts its batch touches; the measured
rates are the best warm repeat, recorded with their method."""

from __future__ import annotations

import json
import os

import torch

from tandem.bench.roofline import ModelShape, Workload, measure, workload_bytes, workload_flops

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "configs")


def _shape(name: str) -> ModelShape:
    with open(os.path.join(CONFIGS, name, "config.json")) as f:
        return ModelShape.from_hf(json.load(f), torch.bfloat16)


def test_qwen3_30b_a3b_active_and_total_parameters():
    s = _shape("qwen3-30b-a3b")
    assert s.num_experts == 128 and s.num_experts_per_tok == 8 and s.num_sparse_layers == 48
    # "A3B": 3.3B active with the embedding (0.31B), which a step only looks up
    active = s.layer_params + s.lm_head_params
    assert 2.95e9 < active < 3.1e9
    # batch 1 reads the active weights; a large batch reads every expert (30.5B in all,
    # less the embedding)
    assert s.weight_bytes == active * 2
    assert 29.9e9 < s.weight_bytes_at(4096) / 2 < 30.3e9
    assert s.weight_bytes < s.weight_bytes_at(8) < s.weight_bytes_at(64) < s.weight_bytes_at(512)
    # FLOPs follow the active parameters
    w = Workload([(128, 256)], max_batch=1)
    expected = (2 * (s.layer_params * 383 + s.lm_head_params * 256)
                + s.attention_flops(1) * 383 * 384 / 2)
    assert abs(workload_flops(s, w) - expected) / expected < 1e-9


def test_dense_model_unchanged():
    s = _shape("llama-3.1-8b")
    assert s.num_experts == 0
    assert s.weight_bytes == s.weight_bytes_at(1024)
    w = Workload([(128, 256)] * 4, max_batch=4)
    assert workload_bytes(s, w) > 256 * s.weight_bytes


def test_measured_rates_are_the_best_repeat_and_recorded():
    rates = measure(torch.device("cpu"), torch.float32)
    assert rates.matmul_flops_per_s >= max(rates.matmul_repeats) > 0
    assert rates.mem_bytes_per_s >= max(rates.copy_repeats) > 0
    assert min(rates.num_repeats) >= 3
    record = json.loads(json.dumps(rates.record()))  # JSON-ready, says how it was measured
    assert record["mem_bytes_per_s"] == rates.mem_bytes_per_s
    assert "best repeat" in record["method"] and len(record["copy_repeats"]) == 3
