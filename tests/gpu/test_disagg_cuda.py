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
    # three engines in this process: fixed pools (memory profiling is per process, so a
    # later engine would count the earlier ones' caches as its own peak)
    kw = dict(device="cuda", dtype="float32", block_size=16, max_model_len=256,
              num_kv_blocks=256)
    prompts = _workload()
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(path, **kw).generate(prompts, sp,
                                                                      use_tqdm=False)]
    d = DisaggLLM(path, policy=DisaggPolicy("always"), **kw)
    assert [o.outputs[0].token_ids for o in d.generate(prompts, sp, use_tqdm=False)] == ref
    assert d.receiver.stats["fallback"] == 0 and d.stats["bytes_sent"] > 0



def _complete_all(url: str, prompts: list[list[int]]) -> list[str]:
    """The prompts at once (threads), greedy, 10 tokens; their texts in order."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    def one(p: list[int]) -> str:
        r = httpx.post(url + "/v1/completions", timeout=120, json={
            "prompt": p, "max_tokens": 10, "temperature": 0.0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def _metric(url: str, name: str, **labels: str) -> float:
    import httpx
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and all(f'{k}="{v}"' in series
                                                for k, v in labels.items()):
            return float(value)
    raise KeyError(name)


@pytest.mark.parametrize("connector", ["ipc", "shm"])
def test_served_prefill_and_decode_workers_on_one_gpu_equal_colocated(tmp_path, connector):
    """`tandem serve --prefill-workers 1 --decode-workers 1`: two engine processes on the
    one GPU, the KV moved device to device through CUDA IPC handles or host-staged through
    a shared-memory file; greedy outputs equal an in-process engine's, and /metrics says
    what moved. (httpx, not the openai client: the GPU machine has no network to install
    it.)"""
    import httpx

    from tandem.bench.serve_cli import start_server, stop_server
    path = make_tiny_model(tmp_path, "LlamaForCausalLM")
    sizes = dict(device="cuda", dtype="float32", block_size=16, max_model_len=256)
    prompts = [[t % 500 + 3 for t in range(i * 7, i * 7 + n)] for i, n in
               enumerate((150, 40, 90, 17, 200, 64))]
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    llm = LLM(path, num_kv_blocks=256, **sizes)
    ref = [o.outputs[0].text for o in llm.generate(prompts, sp, use_tqdm=False)]
    proc, url = start_server(path, "--device cuda --dtype float32 --block-size 16 "
                             "--max-model-len 256 --gpu-memory-utilization 0.2 "
                             "--prefill-workers 1 --disagg-policy always "
                             f"--kv-connector {connector}",
                             str(tmp_path / "server.log"), timeout_s=300)

    try:
        assert _complete_all(url, prompts) == ref
        health = httpx.get(url + "/health", timeout=10).json()
        assert health["status"] == "ok"
        assert all(w["device"].startswith("cuda") for w in health["workers"])
        assert _metric(url, "tandem:disagg_requests_total", route="remote") >= 5
        assert _metric(url, "tandem:disagg_requests_total", route="fallback") == 0
        moved = _metric(url, "tandem:kv_transfer_bytes_total")
        seconds = _metric(url, "tandem:kv_transfer_seconds_sum")
        imported = _metric(url, "tandem:kv_import_seconds_sum")
        print(f"\nserved 1P1D on one GPU ({connector}): {moved / 1e6:.2f} MB shipped, "
              f"{seconds * 1e3:.2f} ms to gather and send, {imported * 1e3:.2f} ms to import")
        assert moved > 0
    finally:
        stop_server(proc)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_served_workers_on_two_gpus_move_kv_point_to_point(tmp_path):
    """1P1D on two GPUs (decode on GPU 0, prefill on GPU 1): `--kv-connector auto` picks the
    NCCL point-to-point path; greedy outputs equal an in-process engine's."""
    import httpx

    from tandem.bench.serve_cli import start_server, stop_server
    path = make_tiny_model(tmp_path, "LlamaForCausalLM")
    sizes = dict(device="cuda", dtype="float32", block_size=16, max_model_len=256)
    prompts = [[t % 500 + 3 for t in range(i * 5, i * 5 + n)] for i, n in
               enumerate((150, 40, 90, 17, 200, 64, 120))]
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    ref = [o.outputs[0].text for o in LLM(path, num_kv_blocks=256, **sizes)
           .generate(prompts, sp, use_tqdm=False)]
    proc, url = start_server(path, "--dtype float32 --block-size 16 --max-model-len 256 "
                             "--gpu-memory-utilization 0.2 --prefill-workers 1 "
                             "--disagg-policy always", str(tmp_path / "server.log"),
                             timeout_s=300)

    try:
        assert _complete_all(url, prompts) == ref
        workers = httpx.get(url + "/health", timeout=10).json()["workers"]
        # each worker sees its own GPU as its only one
        assert sorted(w["role"] for w in workers) == ["decode", "prefill"]
        assert all(w["device"].startswith("cuda") for w in workers)
        assert _metric(url, "tandem:disagg_requests_total", route="remote") >= 6
        assert _metric(url, "tandem:disagg_requests_total", route="fallback") == 0
        assert _metric(url, "tandem:kv_transfer_bytes_total") > 0
        assert "KV transfer group" in open(tmp_path / "server.log").read()
    finally:
        stop_server(proc)
