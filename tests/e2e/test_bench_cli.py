"""The benchmark contract: a table, then one JSON object as the last stdout line with the
device, workload, measured numbers and the hardware bound."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.model_factory import make_tiny_model

COMMON = ["device", "model", "dtype", "date", "command", "git_commit", "elapsed_s",
          "roofline_s", "roofline_fraction"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m"), "LlamaForCausalLM")


@pytest.mark.parametrize("args,keys", [
    (["latency", "--batch-size", "2", "--input-len", "16", "--output-len", "8", "--iters", "1"],
     ["batch_size", "input_len", "output_len", "ttft_ms", "ms_per_output_token",
      "output_tokens_per_s"]),
    (["throughput", "--num-prompts", "6", "--input-len-range", "4", "30",
      "--output-len-range", "2", "9", "--backend", "hf-generate"],
     ["num_prompts", "input_len", "output_len", "output_tokens_per_s", "total_tokens_per_s",
      "peer", "peer_speedup"]),
    (["prefill", "--input-len", "64", "--iters", "1"],
     ["input_len", "ttft_ms", "achieved_flops_per_s", "matmul_flops_per_s"]),
])
def test_bench_prints_table_then_one_json_line(model, args, keys):
    out = subprocess.run([sys.executable, "-m", "tandem", "bench", *args, "--model", model],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    record = json.loads(lines[-1])
    assert len(lines) > 2  # the human table came first
    assert record["benchmark"] == args[0]
    for k in COMMON + keys:
        assert k in record, k
    assert 0 < record["roofline_fraction"] < 1.5
    assert record["roofline_s"] > 0 and record["elapsed_s"] > 0
