"""Mixture-of-experts models on CUDA: the Triton fused-MoE kernel inside the engine (CUDA
graphs for decode) against the same model on the PyTorch reference kernel. Skipped
without CUDA."""

from __future__ import annotations

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.kernels import ops
from tests.model_factory import make_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("arch,moe", [("Qwen3MoeForCausalLM", {"num_experts": 16,
                                                               "num_experts_per_tok": 4}),
                                      ("MixtralForCausalLM", {}),
                                      ("Qwen2MoeForCausalLM", {})])
def test_moe_model_on_cuda_matches_reference_kernel(tmp_path, monkeypatch, arch, moe):
    path = make_tiny_model(tmp_path, arch, hidden_size=128, intermediate_size=256,
                           num_layers=3, moe=moe)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (1, 7, 40, 130)]
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, prompt_logprobs=1)
    kw = dict(device="cuda", dtype="bfloat16", max_model_len=256)
    fast = LLM(path, **kw)
    assert fast.engine.executor.runner.graphs is not None  # decode replays CUDA graphs
    out = fast.generate(prompts, sp, use_tqdm=False)
    del fast
    monkeypatch.setattr(ops, "moe_triton", None)  # the reference kernel, same device
    ref = LLM(path, **kw).generate(prompts, sp, use_tqdm=False)
    for a, b in zip(out, ref):
        # bf16: another summation order may flip a near-tie late in a greedy run
        same = next((i for i, (x, y) in enumerate(zip(a.outputs[0].token_ids,
                                                      b.outputs[0].token_ids)) if x != y), 16)
        assert same >= 8, (a.outputs[0].token_ids, b.outputs[0].token_ids)
        for tok, ea, eb in zip(a.prompt_token_ids[1:], a.prompt_logprobs[1:],
                               b.prompt_logprobs[1:]):
            assert abs(ea[tok] - eb[tok]) < 0.05
