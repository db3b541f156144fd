"""Disaggregation on one GPU: a prefill engine and a decode engine sharing the device, the
KV blocks host-staged through shared memory, against a colocated engine. Skipped without
CUDA."""

from __future__ import annotations

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.disagg.local import DisaggLLM
from tandem.disagg.policy import DisaggPolicy
from tests.e2e.test_disagg_local import _workload
from tests.model_factory import make_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_disaggregated_on_one_gpu_equals_colocated(tmp_path):
    path = make_tiny_model(tmp_path, "LlamaForCausalLM")
    kw = dict(device="cuda", dtype="float32", block_size=16, max_model_len=256,
              gpu_memory_utilization=0.2)  # two engines on one device
    prompts = _workload()
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(path, **kw).generate(prompts, sp,
                                                                      use_tqdm=False)]
    d = DisaggLLM(path, policy=DisaggPolicy("always"), **kw)
    assert [o.outputs[0].token_ids for o in d.generate(prompts, sp, use_tqdm=False)] == ref
    assert d.receiver.stats["fallback"] == 0 and d.stats["bytes_sent"] > 0
