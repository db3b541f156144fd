"""Tensor parallelism on CPU: two gloo worker processes (MultiProcExecutor) against one rank
in-process and against transformers.

Every architecture variant greedy-decodes the same tokens with TP=2 as with TP=1 and as
transformers (float32), under a small token budget (chunked prefill), shared prefixes
(prefix-cache hits) and a pool small enough to force preemption; seeded sampling draws the
same tokens; a request that makes the model raise ends alone; a multi-node rendezvous on
loopback works; and a served TP=2 engine answers the openai client, then fails its live
streams and exits non-zero when a worker is killed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from tandem import LLM, SamplingParams
from tandem.executor import ExecutorDead
from tandem.executor.multiproc import free_port
from tests.e2e.test_llm_parity import ARCHS, MAX_TOKENS, _hf_greedy, _prompts
from tests.e2e.test_server import REPO, start_server, stop_server
from tests.model_factory import make_tiny_model

pytestmark = pytest.mark.slow

# The parity test's engine sizes: 16-token steps, 24 blocks of 4 tokens (preemption).
SIZES = dict(block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=8,
             max_model_len=64)


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("arch,kw", ARCHS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(ARCHS)])
def test_tp2_greedy_matches_tp1_and_transformers(tmp_path, arch, kw):
    path = make_tiny_model(tmp_path, arch, **kw)
    prompts = _prompts()
    tp1 = LLM(path, **SIZES)
    expected = _greedy(tp1, prompts)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert expected == [_hf_greedy(hf, p, MAX_TOKENS) for p in prompts]
    tp2 = LLM(path, tensor_parallel_size=2, **SIZES)
    try:
        assert tp2.engine.runner is None  # the ranks run in worker processes
        assert _greedy(tp2, prompts) == expected
        stats = tp2.engine.stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
        assert stats.num_kv_blocks_used == 0
        # Prompt logprobs come from the gathered vocab-parallel logits.
        lp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3)
        for a, b in zip(tp1.generate(prompts[:3], lp, use_tqdm=False),
                        tp2.generate(prompts[:3], lp, use_tqdm=False)):
            for ea, eb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
                assert ea.keys() == eb.keys()
                assert all(abs(ea[t].logprob - eb[t].logprob) < 1e-4 for t in ea)
    finally:
        tp2.engine.shutdown()


MOE_ARCHS = [(a, kw) for a, kw in ARCHS if "Moe" in a or "Mixtral" in a]
EP_CASES = [(a, kw, "allreduce") for a, kw in MOE_ARCHS] + [
    (a, kw, "alltoall") for a, kw in MOE_ARCHS if a == "Qwen3MoeForCausalLM"]


@pytest.mark.parametrize("arch,kw,dispatch", EP_CASES,
                         ids=[f"{a}-{d}" for a, _, d in EP_CASES])
def test_expert_parallel_matches_one_rank(tmp_path, arch, kw, dispatch):
    """Each rank owns half of the experts whole. allreduce: tokens routed to the other half
    are this rank's -1s and an all-reduce combines; alltoall: each rank sends its slice of
    the tokens to the experts' owners and back (one-token decode steps leave rank 1's slice
    empty). Greedy tokens and prompt logprobs equal one rank's."""
    path = make_tiny_model(tmp_path, arch, **kw)
    prompts = _prompts()
    lp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3)
    tp1 = LLM(path, **SIZES)
    expected, ref_lp = _greedy(tp1, prompts), tp1.generate(prompts[:3], lp, use_tqdm=False)
    ep2 = LLM(path, tensor_parallel_size=2, enable_expert_parallel=True,
              expert_dispatch=dispatch, **SIZES)
    try:
        assert _greedy(ep2, prompts) == expected
        for a, b in zip(ref_lp, ep2.generate(prompts[:3], lp, use_tqdm=False)):
            for ea, eb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
                assert ea.keys() == eb.keys()
                assert all(abs(ea[t].logprob - eb[t].logprob) < 1e-4 for t in ea)
    finally:
        ep2.engine.shutdown()


def test_tp2_seeded_sampling_and_async_match_tp1(tmp_path):
    path = make_tiny_model(tmp_path, "Qwen3ForCausalLM", head_dim=32)
    prompts = _prompts()
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=100 + i,
                             max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
              for i in range(len(prompts))]
    ref = LLM(path, **SIZES).generate(prompts, params, use_tqdm=False)
    # async scheduling: each step planned while the previous one is in flight in the workers
    tp2 = LLM(path, tensor_parallel_size=2, async_scheduling=True, **SIZES)
    try:
        got = tp2.generate(prompts, params, use_tqdm=False)
        for a, b in zip(ref, got):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert la.keys() == lb.keys()
        # n > 1: the children's seeds differ, and match TP=1's children too.
        n3 = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
        a3 = LLM(path, **SIZES).generate(prompts[:2], n3, use_tqdm=False)
        b3 = tp2.generate(prompts[:2], n3, use_tqdm=False)
        assert [[c.token_ids for c in o.outputs] for o in a3] == \
            [[c.token_ids for c in o.outputs] for o in b3]
    finally:
        tp2.engine.shutdown()


def test_tp2_failing_request_ends_alone(tmp_path, monkeypatch):
    fault = 4321 % 500  # a token id the tiny vocab has
    monkeypatch.setenv("TANDEM_FAULT_TOKEN_ID", str(fault))  # the workers inherit it
    path = make_tiny_model(tmp_path, "LlamaForCausalLM")
    prompts = [p for p in _prompts() if fault not in p][:4]
    expected = _greedy(LLM(path, **SIZES), prompts)
    tp2 = LLM(path, tensor_parallel_size=2, **SIZES)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = tp2.generate(prompts[:2] + [[fault, 5, 6]] + prompts[2:], params,
                            use_tqdm=False)
        assert outs[2].outputs[0].finish_reason == "error"
        assert [o.outputs[0].token_ids for i, o in enumerate(outs) if i != 2] == expected
        assert _greedy(tp2, prompts) == expected  # and the engine goes on serving
    finally:
        tp2.engine.shutdown()


def test_tp_errors_are_clear(tmp_path):
    path = make_tiny_model(tmp_path, "LlamaForCausalLM")  # 4 attention heads
    with pytest.raises(ExecutorDead, match=r"num_attention_heads \(4\) is not divisible by "
                                           r"tensor_parallel_size \(3\)"):
        LLM(path, tensor_parallel_size=3, **SIZES)
    with pytest.raises(ValueError, match="'uni' runs one rank"):
        LLM(path, tensor_parallel_size=2, distributed_executor_backend="uni")
    with pytest.raises(ValueError, match="needs master_port"):
        LLM(path, tensor_parallel_size=2, nnodes=2)


def test_two_node_rendezvous_on_loopback(tmp_path):
    """Node 0 (this process: engine + rank 0) and node 1 (`tandem serve --node-rank 1`:
    rank 1 only) meet through MASTER_ADDR/MASTER_PORT, as on two machines."""
    path = make_tiny_model(tmp_path, "MistralForCausalLM")
    prompts = _prompts()
    expected = _greedy(LLM(path, **SIZES), prompts)
    port = free_port()
    flags = ["-tp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port",
             str(port)]
    log = open(tmp_path / "node1.log", "w")
    node1 = subprocess.Popen([sys.executable, "-m", "tandem", "serve", path, *flags,
                              "--node-rank", "1"], cwd=REPO, stdout=log, stderr=log)
    try:
        llm = LLM(path, tensor_parallel_size=2, nnodes=2, node_rank=0, master_port=port,
                  **SIZES)
        assert _greedy(llm, prompts) == expected
        llm.engine.shutdown()
        assert node1.wait(timeout=30) == 0  # its worker exits when told, and so does it
    finally:
        if node1.poll() is None:
            node1.kill()
        log.close()


def test_served_tp2_then_a_worker_dies(tmp_path):
    path = make_tiny_model(tmp_path, "Qwen2ForCausalLM")
    srv = start_server(path, str(tmp_path / "server.log"), "-tp", "2",
                       "--served-model-name", "tiny", timeout=180)
    try:
        client = srv.client()
        # The openai client against TP=2 gives TP=1's greedy tokens.
        expected = _greedy(LLM(path, max_model_len=512, num_kv_blocks=512), [[5, 6, 7, 8]])
        out = client.completions.create(model="tiny", prompt=[5, 6, 7, 8],
                                        max_tokens=MAX_TOKENS, temperature=0.0,
                                        extra_body={"ignore_eos": True})
        tok = LLM(path, max_model_len=512, num_kv_blocks=512).get_tokenizer()
        assert out.choices[0].text == tok.decode(expected[0])
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
            stream=True)
        assert sum(1 for _ in chat) >= 1
        pids = [int(p) for p in re.findall(r"rank \d+ pid (\d+)", srv.log())]
        assert len(pids) == 2, srv.log()[-2000:]
        # A long stream is live when rank 1 is killed.
        stream = client.completions.create(model="tiny", prompt="hello", max_tokens=400,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(openai.APIError):
            for _ in stream:
                pass
        code = srv.proc.wait(timeout=10)  # the server exits, non-zero, within 10 s
        assert code != 0 and time.monotonic() - killed < 10
        assert "the engine stopped" in srv.log() or "worker" in srv.log()
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.url + "/health", timeout=2)
        for pid in pids:  # no worker is left behind
            _wait_gone(pid)
    finally:
        stop_server(srv)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} is still running")


def test_tp2_with_speculation_matches_tp1_plain(tmp_path):
    """Speculative decoding across two ranks (each runs the proposer on the same plans):
    greedy and seeded outputs equal TP=1 without speculation."""
    path = make_tiny_model(tmp_path, "LlamaForCausalLM")
    prompts = _prompts() + [[5, 6, 7, 8] * 4 + [5, 6]]  # the last one drafts for sure
    spec = {"method": "ngram", "num_speculative_tokens": 3, "auto_switch": False}
    seeded = [SamplingParams(temperature=0.8, seed=i, max_tokens=MAX_TOKENS, ignore_eos=True)
              for i in range(len(prompts))]
    tp1 = LLM(path, **SIZES)
    ref_greedy, ref_seeded = _greedy(tp1, prompts), tp1.generate(prompts, seeded,
                                                                 use_tqdm=False)
    tp2 = LLM(path, tensor_parallel_size=2, speculative_config=spec, **SIZES)
    try:
        assert _greedy(tp2, prompts) == ref_greedy
        got = tp2.generate(prompts, seeded, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == \
            [o.outputs[0].token_ids for o in ref_seeded]
        assert tp2.engine.stats().spec_drafted_total > 0
    finally:
        tp2.engine.shutdown()
