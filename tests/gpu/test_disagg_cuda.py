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


def test_served_prefill_and_decode_workers_on_one_gpu_equal_colocated(tmp_path):
    """`tandem serve --prefill-workers 1 --decode-workers 1`: two engine processes on the
    one GPU, the KV host-staged between them; greedy outputs equal an in-process engine's,
    and /metrics says what moved."""
    import httpx

    from tests.e2e.test_disagg_serve import _complete_all
    from tests.e2e.test_server import start_server, stop_server
    path = make_tiny_model(tmp_path, "LlamaForCausalLM")
    sizes = dict(device="cuda", dtype="float32", block_size=16, max_model_len=256)
    prompts = [[t % 500 + 3 for t in range(i * 7, i * 7 + n)] for i, n in
               enumerate((150, 40, 90, 17, 200, 64))]
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    ref = [o.outputs[0].text for o in LLM(path, gpu_memory_utilization=0.2, **sizes)
           .generate(prompts, sp, use_tqdm=False)]
    server = start_server(path, str(tmp_path / "server.log"), "--served-model-name", "tiny",
                          "--device", "cuda", "--dtype", "float32", "--block-size", "16",
                          "--max-model-len", "256", "--gpu-memory-utilization", "0.2",
                          "--prefill-workers", "1", "--disagg-policy", "always",
                          defaults=False, timeout=300.0)
    try:
        assert _complete_all(server, prompts) == ref
        health = httpx.get(server.url + "/health", timeout=10).json()
        assert health["status"] == "ok"
        assert all(w["device"].startswith("cuda") for w in health["workers"])
        assert server.metric("tandem:disagg_requests_total", route="remote") >= 5
        assert server.metric("tandem:disagg_requests_total", route="fallback") == 0
        moved = server.metric("tandem:kv_transfer_bytes_total")
        seconds = server.metric("tandem:kv_transfer_seconds_sum")
        print(f"\nserved 1P1D on one GPU: {moved / 1e6:.2f} MB shipped in {seconds * 1e3:.2f} ms "
              f"(export + send)")
        assert moved > 0
    finally:
        stop_server(server)
