"""`tandem eval`: bits per byte through the engine's prompt logprobs, checked against a
direct transformers computation over the same windows."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tandem import LLM
from tandem.eval import score_files, xz_bits
from tests.e2e.test_bench_cli import run_on_a_terminal
from tests.model_factory import make_tiny_model

SOURCE = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n" * 6


def test_bits_per_byte_matches_transformers(tmp_path):
    path = make_tiny_model(tmp_path / "m", "LlamaForCausalLM")
    f = tmp_path / "code.py"
    f.write_text(SOURCE)
    llm = LLM(path, max_model_len=40)  # forces several windows of 38 tokens
    score = score_files(llm, [str(f)])[0]
    tok = llm.get_tokenizer()
    ids = tok.encode(SOURCE, add_special_tokens=False)
    ctx = tok.bos_token_id if tok.bos_token_id is not None else min(tok.eos_token_ids)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nats = 0.0
    for start in range(0, len(ids), 38):
        w = [ctx] + ids[start:start + 38]
        with torch.no_grad():
            lp = hf(torch.tensor([w])).logits[0].log_softmax(-1)
        nats -= sum(lp[i - 1, w[i]].item() for i in range(1, len(w)))
    assert len(ids) > 2 * 38 and score.num_tokens == len(ids)
    assert score.model_bits == pytest.approx(nats / math.log(2), rel=1e-4)
    assert score.num_bytes == len(SOURCE.encode())
    assert score.xz_bits == xz_bits(SOURCE.encode())


def test_eval_cli_prints_table_and_json(tmp_path):
    path = make_tiny_model(tmp_path / "m", "LlamaForCausalLM")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.py").write_text(SOURCE)
    (tmp_path / "d" / "b.py").write_text("import os\nprint(os.getcwd())\n")
    out = subprocess.run([sys.executable, "-m", "tandem", "eval", "--model", path,
                          str(tmp_path / "d"), "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["num_files"] == 2 and record["bits_per_byte"] > 0
    assert "TOTAL" in out.stdout
    # On a terminal the engine's bar of scored windows goes to stderr, never stdout.
    code, tty_out, err = run_on_a_terminal(["eval", "--model", path, str(tmp_path / "d")],
                                           str(tmp_path / "err"))
    assert code == 0, err
    assert "100%" in err and "100%" not in tty_out
    assert json.loads(tty_out.strip().splitlines()[-1])["num_files"] == 2
