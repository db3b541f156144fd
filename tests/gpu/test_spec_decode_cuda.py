"""Speculative decoding on CUDA (Triton kernels, CUDA graphs for the verify rows): greedy
output with drafts (an oracle that spoils some, and ngram) equals plain decoding, in
float32 and bfloat16; the switch profiles its step costs on the device. Skipped without
CUDA."""

from __future__ import annotations

import pytest
import torch

from tandem import LLM, SamplingParams
from tests.e2e.test_spec_decode import OracleProposer, _runner
from tests.model_factory import make_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_with_speculation_on_cuda(tmp_path, dtype):
    path = make_tiny_model(tmp_path, "LlamaForCausalLM")
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41], list(range(100, 130))] * 3
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = LLM(path, device="cuda", dtype=dtype, max_model_len=128)
    ref = [o.outputs[0].token_ids for o in plain.generate(prompts, sp, use_tqdm=False)]
    del plain
    spec = LLM(path, device="cuda", dtype=dtype, max_model_len=128,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4})
    costs = spec.engine.executor.spec_costs["verify"]
    assert costs and all(t > 0 for t in costs.values())
    assert spec.engine.executor.runner.graphs is not None  # verify rows replay graphs
    runner = _runner(spec)
    runner.proposer = OracleProposer([p + r for p, r in zip(prompts, ref)])
    outs = [o.outputs[0].token_ids for o in spec.generate(prompts, sp, use_tqdm=False)]
    if dtype == "float32":
        assert outs == ref
    else:  # verify runs the linears at k+1 rows (another GEMM than the 1-row GEMV): bf16
        # rounding may flip a near-tie, as in every engine; nearly all must agree
        assert sum(o == r for o, r in zip(outs, ref)) >= len(ref) - 2, (outs, ref)
    s = spec.engine.stats()
    assert 0 < s.spec_accepted_total < s.spec_drafted_total
