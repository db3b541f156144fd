"""CPU throughput against transformers: a ~30M-parameter Llama with random weights, 48
prompts of 16-200 tokens, 16-128 output tokens each, against one padded
`transformers.generate` batch on the same prompts.

Issue 2 asks for 2x. The work itself differs by only ~1.8x (padding and static batching
make transformers compute ~0.67 TFLOP against tandem's ~0.37), so the rest comes from doing
each FLOP better: oneDNN on reordered weights for decode-sized matmuls (MKL is slow there
on this machine), prefill MLPs in row chunks, and decode attention in the C kernel that
reads paged K/V in place. Measured on the 2-core development machine: 2.32-2.59x.

The same measurement as a benchmark (table + JSON line):
    tandem bench throughput --model DIR --num-prompts 48 --input-len-range 16 200 \
        --output-len-range 16 128 --backend hf-generate
"""

from __future__ import annotations

import random

import pytest
import torch

from tandem import LLM
from tandem.bench.cli import measure_tandem_throughput
from tandem.bench.peer import load_hf_model, run_hf_generate
from tests.model_factory import make_tiny_model


@pytest.mark.slow
def test_cpu_throughput_against_transformers(tmp_path):
    path = make_tiny_model(tmp_path, "LlamaForCausalLM", hidden_size=512, num_layers=5,
                           num_heads=8, num_kv_heads=4, intermediate_size=1408,
                           vocab_size=32000, max_position_embeddings=1024,
                           tie_word_embeddings=True, weight_std=0.02)
    hf = load_hf_model(path, torch.device("cpu"), torch.float32)
    params = sum(p.numel() for p in hf.parameters())
    assert 25e6 < params < 35e6, params
    rng = random.Random(0)
    in_lens = [rng.randint(16, 200) for _ in range(48)]
    out_lens = [rng.randint(16, 128) for _ in range(48)]
    prompts = [[rng.randrange(32000) for _ in range(n)] for n in in_lens]

    llm = LLM(path)
    t_elapsed, t_tokens = measure_tandem_throughput(llm, prompts, out_lens)
    assert t_tokens == sum(out_lens)
    run_hf_generate(hf, prompts[:2], [4, 4])  # warm-up, as tandem had
    h_elapsed, h_tokens = run_hf_generate(hf, prompts, out_lens)
    ratio = (t_tokens / t_elapsed) / (h_tokens / h_elapsed)
    print(f"\nCPU throughput: tandem {t_elapsed:.2f} s, transformers generate "
          f"{h_elapsed:.2f} s, speedup {ratio:.2f}x ({params / 1e6:.1f}M params)")
    assert ratio >= 2.0
