"""Step inputs: the host path for short steps (positions and cache slots computed in Python,
shipped with the step's one copy) gives exactly what the device path computes, for mixed
batches of decodes (in flight or not) and prefill chunks with prompt logprobs."""

from __future__ import annotations

import random

import torch

from tandem.outputs import ScheduledSeq, StepPlan
from tandem.request import SamplingParams
from tandem.runner import input_batch
from tandem.runner.request_state import RequestState


def _case(rng: random.Random, block_size: int):
    states, seqs = {}, []
    for i in range(rng.randint(1, 6)):
        rid = f"r{i}"
        prompt = rng.randint(1, 40)
        start = rng.randint(0, prompt + 10)
        qlen = 1 if start >= prompt else rng.randint(1, prompt - start)
        tokens = [rng.randrange(1000) for _ in range(max(prompt, start + qlen))]
        blocks = rng.sample(range(100), -(-(start + qlen) // block_size))
        params = SamplingParams(temperature=0.0,
                                prompt_logprobs=1 if rng.random() < 0.3 else None)
        states[rid] = RequestState(rid, prompt, tokens, blocks, params, [], (0.0,) * 7)
        inflight = qlen == 1 and start >= prompt and rng.random() < 0.5
        seqs.append(ScheduledSeq(rid, start, qlen, start + qlen >= prompt,
                                 inflight_input=inflight))
    plan = StepPlan(seqs=seqs, num_batched_tokens=sum(s.num_new_tokens for s in seqs))
    return plan, states, {s.request_id: j for j, s in enumerate(seqs) if s.inflight_input}


def test_host_positions_match_the_device_path(monkeypatch):
    rng = random.Random(0)
    for case in range(60):
        block_size = rng.choice([1, 4, 16])
        plan, states, inflight = _case(rng, block_size)
        built = []
        for limit in (0, 10**6):  # device path, host path
            monkeypatch.setattr(input_batch, "HOST_POSITIONS_MAX", limit)
            built.append(input_batch.build_model_inputs(plan, states, block_size,
                                                        torch.device("cpu"), inflight))
        dev, host = built
        assert torch.equal(dev.positions, host.positions), case
        assert torch.equal(dev.attn_metadata.slot_mapping, host.attn_metadata.slot_mapping)
        for name in ("input_ids", "logits_indices", "inflight_rows", "inflight_src"):
            a, b = getattr(dev, name), getattr(host, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        # and they are right: row r of a sequence sits at start + r, in its block's slot
        row = 0
        for seq in plan.seqs:
            table = states[seq.request_id].block_ids
            for p in range(seq.start_pos, seq.end_pos):
                assert host.positions[row] == p
                assert host.attn_metadata.slot_mapping[row] == (
                    table[p // block_size] * block_size + p % block_size)
                row += 1


def test_plain_greedy_steps_build_no_sampling_tensors():
    plan, states, _ = _case(random.Random(1), 4)
    rows = list(range(len(plan.seqs)))
    assert input_batch.build_sampling_tensors(plan, states, rows, 1000, torch.device("cpu")) \
        is None
    rid = plan.seqs[0].request_id
    states[rid].params = SamplingParams(temperature=0.5)
    t = input_batch.build_sampling_tensors(plan, states, rows, 1000, torch.device("cpu"))
    assert t is not None and not t.all_greedy
