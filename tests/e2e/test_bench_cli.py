"""The benchmark contract: a table, then one JSON object as the last stdout line with the
device, workload, measured numbers and the hardware bound; a progress bar, drawn only when
stdout is a terminal, goes to stderr."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

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
    (["prefill", "--input-len", "64", "--iters", "1", "--no-progress"],
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


def run_on_a_terminal(args: list[str], stderr_path: str) -> tuple[int, str, str]:
    """Run `python -m tandem ARGS` with stdout on a pseudo-terminal (so the bar is drawn) and
    stderr in a file: (exit status, stdout with plain newlines, stderr)."""
    primary, secondary = pty.openpty()
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tandem", *args], stdout=secondary,
                                stderr=err, stdin=subprocess.DEVNULL)
    os.close(secondary)
    chunks, deadline = [], time.monotonic() + 300
    while select.select([primary], [], [], max(0.0, deadline - time.monotonic()))[0]:
        try:
            data = os.read(primary, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    try:
        code = proc.wait(timeout=10)
    finally:
        proc.kill()  # nothing to do once it has exited
    with open(stderr_path) as f:
        return code, b"".join(chunks).decode().replace("\r\n", "\n"), f.read()


def test_bar_on_a_terminal_goes_to_stderr(model, tmp_path):
    code, out, err = run_on_a_terminal(
        ["bench", "latency", "--input-len", "16", "--output-len", "4", "--iters", "2",
         "--model", model], str(tmp_path / "err"))
    assert code == 0, err
    assert "latency" in err and "3/3" in err  # one warm-up run and two measured ones
    lines = out.strip().splitlines()
    assert json.loads(lines[-1])["benchmark"] == "latency"
    assert "3/3" not in out and "\r" not in out
