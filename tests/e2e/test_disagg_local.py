"""Prefill/decode disaggregation in one process (disagg/local.py): a prefill engine, a
decode engine and the shared-memory connector between them, against a colocated engine."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.disagg import transfer
from tandem.disagg.connector import KVConnector, KVPayload, SharedMemoryConnector
from tandem.disagg.local import DisaggLLM
from tandem.disagg.policy import DisaggPolicy
from tests.model_factory import make_tiny_model

SIZES = dict(block_size=4, max_model_len=128, num_kv_blocks=96)


def _workload() -> list[list[int]]:
    """Long prompts sharing a 40-token prefix, short ones, and one exactly on a block edge."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 500, (40,), generator=g).tolist()
    own = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (1, 9, 30, 3, 60, 17)]
    return [shared + own[0], shared + own[1], shared + own[2], own[3], own[4], own[5],
            shared[:8] + [7]]


def _greedy(llm, prompts):
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("disagg"), "Qwen3ForCausalLM", head_dim=32)


@pytest.mark.parametrize("policy", ["always", "never", "conditional"])
def test_one_prefill_one_decode_equals_colocated(tiny, policy):
    prompts = _workload()
    ref = _greedy(LLM(tiny, **SIZES), prompts)
    rule = DisaggPolicy(policy, min_remote_tokens=24)  # the test's prompts are short
    d = DisaggLLM(tiny, policy=rule, **SIZES)
    assert _greedy(d, prompts) == ref
    s = d.stats
    assert d.receiver.stats["fallback"] == 0
    if policy == "never":
        assert s["remote"] == 0 and s["blocks_sent"] == 0
    else:
        assert s["remote"] >= (2 if policy == "conditional" else 6)
        assert s["local"] >= (1 if policy == "always" else 3)
        # the shared prefix moved once: later requests found it on the decode side
        assert s["blocks_sent"] < sum((len(p) - 1) // 4 for p in prompts)
        assert d.engine.stats().prefix_cache_hits > 0
    # seeded sampling draws the same tokens too (the first token is the decode side's)
    sp = [SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=8,
                         ignore_eos=True) for i in range(len(prompts))]
    assert ([o.outputs[0].token_ids for o in d.generate(prompts, sp, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in LLM(tiny, **SIZES).generate(
                prompts, sp, use_tqdm=False)])


def test_blocks_arrive_bit_identical(tiny):
    d = DisaggLLM(tiny, policy="never", **SIZES)
    prompt = _workload()[4]  # 60 tokens: 14 full blocks looked up
    d.prefill.add_request("x", {"prompt_token_ids": prompt},
                          SamplingParams(temperature=0.0, max_tokens=1))
    while d.prefill.has_unfinished_requests():
        d.prefill.step()
    hashes = transfer.prompt_hashes(d.prefill, prompt)
    assert len(hashes) == 14 and transfer.cached_blocks(d.engine, hashes) == 0
    sent = transfer.export_prompt(d.prefill, "x", hashes, 0)
    d.connector.send(sent)
    got = d.connector.recv("x")
    assert got.hashes == hashes and d.connector.recv("x") is None  # consumed once
    assert transfer.import_payload(d.engine, got)
    assert transfer.cached_blocks(d.engine, hashes) == 14
    ids = d.engine.scheduler.kv.pin_cached(hashes)
    from tandem.runner.kv_memory import read_blocks
    back = read_blocks(d.engine.executor.runner.kv_caches, ids)
    d.engine.scheduler.kv.unpin(ids)
    for a, b in zip(sent.layers, back):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


class _Lossy(KVConnector):
    """Loses every other payload: those requests must fall back to local prefill."""

    def __init__(self):
        self.inner, self.n = SharedMemoryConnector(uuid.uuid4().hex), 0

    def send(self, payload):
        self.n += 1
        if self.n % 2:
            self.inner.send(payload)

    def recv(self, request_id):
        return self.inner.recv(request_id)


def test_a_lost_transfer_falls_back_to_local_prefill(tiny):
    prompts = _workload()
    ref = _greedy(LLM(tiny, **SIZES), prompts)
    d = DisaggLLM(tiny, policy="always", connector=_Lossy(), kv_timeout_s=0.2, **SIZES)
    assert _greedy(d, prompts) == ref
    assert d.receiver.stats["fallback"] >= 2


def test_shared_memory_crosses_processes():
    """A payload sent here (bf16 and e4m3 layers) is received by another process."""
    ns = uuid.uuid4().hex
    layers = [torch.randn(2, 3, 4, 2, 8).to(torch.bfloat16),
              torch.randn(2, 3, 4, 2, 8).to(torch.float8_e4m3fn)]
    SharedMemoryConnector(ns).send(KVPayload("r/1", [1, 2**255 + 7, 3], layers))
    code = f"""
import torch
from tandem.disagg.connector import SharedMemoryConnector
p = SharedMemoryConnector({ns!r}).recv("r/1")
print(p.hashes == [1, 2**255 + 7, 3], [str(t.dtype) for t in p.layers],
      [float(t.float().sum()) for t in p.layers])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")[0]
    want = f"True {[str(t.dtype) for t in layers]} {[float(t.float().sum()) for t in layers]}"
    assert out == want
    assert SharedMemoryConnector(ns).recv("r/1") is None  # unlinked by the receiver


def test_import_without_room_changes_nothing(tiny):
    d = DisaggLLM(tiny, policy="never", **SIZES)
    big = KVPayload("z", list(range(1000)), [torch.zeros(0)])
    free = d.engine.scheduler.kv.num_free_blocks
    assert not transfer.import_payload(d.engine, big)
    assert d.engine.scheduler.kv.num_free_blocks == free


def test_awaiting_kv_needs_a_receiver(tiny):
    llm = LLM(tiny, **SIZES)
    with pytest.raises(ValueError, match="kv_receiver"):
        llm.engine.add_request("a", {"prompt_token_ids": [5, 6, 7]},
                               SamplingParams(max_tokens=2), awaiting_kv=True)
    assert not llm.engine.has_unfinished_requests()


def test_an_aborted_batch_leaves_nothing_behind(tiny, monkeypatch):
    """generate raising midway aborts its requests on both engines; the next call works and
    no payload is left in shared memory."""
    prompts = _workload()
    d = DisaggLLM(tiny, policy="always", **SIZES)
    calls = []
    step = d.engine.step

    def failing_step():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return step()
    monkeypatch.setattr(d.engine, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        _greedy(d, prompts)
    assert not d.engine.has_unfinished_requests() and not d.prefill.has_unfinished_requests()
    monkeypatch.setattr(d.engine, "step", step)
    assert _greedy(d, prompts) == _greedy(LLM(tiny, **SIZES), prompts)
    for rid in map(str, range(len(prompts))):  # the first batch's ids: nothing lingers
        assert d.connector.recv(rid) is None


def test_resending_replaces_a_stale_payload():
    c = SharedMemoryConnector(uuid.uuid4().hex)
    old = KVPayload("r", [1], [torch.zeros(2, 1, 2, 1, 4)])
    new = KVPayload("r", [2], [torch.ones(2, 1, 2, 1, 4)])
    c.send(old)
    c.send(new)
    got = c.recv("r")
    assert got.hashes == [2] and torch.equal(got.layers[0], new.layers[0])
    c.send(old)
    c.discard("r")
    assert c.recv("r") is None


def test_a_failed_prefill_engine_leaves_every_request_to_the_decode_engine(tiny,
                                                                           monkeypatch):
    from tandem.executor import ExecutorDead
    prompts = _workload()
    ref = _greedy(LLM(tiny, **SIZES), prompts)
    d = DisaggLLM(tiny, policy="always", **SIZES)

    def dead():
        raise ExecutorDead("prefill worker lost")
    monkeypatch.setattr(d.prefill, "step", dead)
    assert _greedy(d, prompts) == ref  # nothing lost, nothing duplicated
    assert d.prefill is None and d.receiver.stats["fallback"] == d.stats["remote"] > 0
    assert _greedy(d, prompts) == ref and d.stats["remote"] == d.receiver.stats["fallback"]


def test_a_saturated_prefill_engine_keeps_requests_local(tiny):
    """conditional: once the prefill engine's backlog passes max_prefill_queue_tokens, the
    rest of a batch prefills on the decode engine."""
    prompts = _workload()
    rule = DisaggPolicy("conditional", min_remote_tokens=8, min_uncached_fraction=0.0,
                        max_prefill_queue_tokens=50)
    d = DisaggLLM(tiny, policy=rule, **SIZES)
    assert _greedy(d, prompts) == _greedy(LLM(tiny, **SIZES), prompts)
    assert d.stats["remote"] == 2 and d.stats["local"] == 5  # 41 + 49 tokens queued: full
