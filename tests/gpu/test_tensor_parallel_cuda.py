"""Tensor parallelism on two GPUs: NCCL, CUDA graphs with the all-reduces captured, async
scheduling, and the custom IPC all-reduce for decode-sized messages. Skipped with fewer than
two GPUs (run on the lent 2 x H200)."""

from __future__ import annotations

import pytest
import torch

from tandem import LLM, SamplingParams
from tests.model_factory import make_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]


@pytest.mark.parametrize("arch,kw", [("LlamaForCausalLM", {"num_kv_heads": 1}),
                                     ("Qwen3ForCausalLM", {"head_dim": 32})])
def test_tp2_on_cuda_matches_tp1(tmp_path, arch, kw):
    path = make_tiny_model(tmp_path, arch, **kw)
    sizes = dict(device="cuda", dtype="float32", block_size=4, num_kv_blocks=64,
                 max_model_len=64, max_num_batched_tokens=16, max_num_seqs=8)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41], list(range(100, 130)), [7] * 20]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    seeded = [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=12,
                             ignore_eos=True) for i in range(len(prompts))]
    tp1 = LLM(path, **sizes)
    expected = [o.outputs[0].token_ids for o in tp1.generate(prompts, greedy, use_tqdm=False)]
    expected_seeded = [o.outputs[0].token_ids
                       for o in tp1.generate(prompts, seeded, use_tqdm=False)]
    del tp1
    tp2 = LLM(path, tensor_parallel_size=2, **sizes)  # CUDA graphs, async scheduling
    try:
        assert tp2.engine.async_scheduling
        got = [o.outputs[0].token_ids for o in tp2.generate(prompts, greedy, use_tqdm=False)]
        assert got == expected
        got = [o.outputs[0].token_ids for o in tp2.generate(prompts, seeded, use_tqdm=False)]
        assert got == expected_seeded
    finally:
        tp2.engine.shutdown()
