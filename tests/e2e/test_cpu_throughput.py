"""CPU throughput against transformers: a ~30M-parameter Llama with random weights, 48
prompts of 16-200 tokens, 16-128 output tokens each, against one padded
`transformers.generate` batch on the same prompts.

Issue 2 asks for 2x. The work itself differs by only ~1.8x (padding and static batching
make transformers compute ~0.67 TFLOP against tandem's ~0.37), so the rest comes from doing
each FLOP better: oneDNN on reordered weights for decode-sized matmuls (MKL is slow there
on this machine), prefill MLPs in row chunks, and decode attention in the C kernel that
reads paged K/V in place. Each side's time is its faster of two runs (different
prompts, same lengths). Measured on the 2-core development machine: 2.18x and 2.21x
(single runs ranged 1.85-2.90x with the machine's noise).

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
    # Two prompt sets of the same lengths (tandem's second run must not hit its prefix
    # cache); each side keeps its faster run, since a shared 2-core machine is noisy.
    sets = [[[rng.randrange(32000) for _ in range(n)] for n in in_lens] for _ in range(2)]

    llm = LLM(path)
    tandem_runs = [measure_tandem_throughput(llm, p, out_lens, warmup=i == 0)
                   for i, p in enumerate(sets)]
    assert all(tokens == sum(out_lens) for _, tokens in tandem_runs)
    run_hf_generate(hf, sets[0][:2], [4, 4])  # warm-up, as tandem had
    hf_runs = [run_hf_generate(hf, p, out_lens) for p in sets]
    assert all(tokens == sum(out_lens) for _, tokens in hf_runs)
    t_elapsed = min(t for t, _ in tandem_runs)
    h_elapsed = min(t for t, _ in hf_runs)
    ratio = h_elapsed / t_elapsed  # same output tokens on both sides
    print(f"\nCPU throughput (best of 2 each): tandem {t_elapsed:.2f} s "
          f"({', '.join(f'{t:.2f}' for t, _ in tandem_runs)}), transformers generate "
          f"{h_elapsed:.2f} s ({', '.join(f'{t:.2f}' for t, _ in hf_runs)}), "
          f"speedup {ratio:.2f}x ({params / 1e6:.1f}M params)")
    assert ratio >= 2.0
