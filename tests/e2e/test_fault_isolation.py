"""One request's failure stays its own: validation rejects what would break a step before it
is queued, and a step that raises anyway ends only the request that causes it (finish_reason
"error"); every other request produces exactly the tokens it produces without the culprit.
Faults are injected with the runner's fault hook (TANDEM_FAULT_TOKEN_ID in a server)."""

from __future__ import annotations

import pytest

from tandem import LLM, SamplingParams
from tests.model_factory import make_tiny_model

FAULT = 77  # the injected fault hits any request whose prompt holds this token id
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17], [3, 4]]


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(tmp_path_factory, request):
    path = make_tiny_model(tmp_path_factory.mktemp("m"), "LlamaForCausalLM")
    llm = LLM(path, max_model_len=128, max_num_batched_tokens=64,
              async_scheduling=request.param)
    llm.engine.runner.fault_token_id = FAULT
    return llm


def _run(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]):
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("culprit_at", [0, 2, 4])
def test_a_failing_request_ends_alone(llm, culprit_at):
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=5, seed=1, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)]
    alone = _run(llm, PROMPTS, params)
    culprit = [1, 2, FAULT, 3]
    prompts = PROMPTS[:culprit_at] + [culprit] + PROMPTS[culprit_at:]
    mixed = _run(llm, prompts, params[:culprit_at] + [params[0]] + params[culprit_at:])
    bad = mixed.pop(culprit_at)
    assert bad.finished and bad.outputs[0].finish_reason == "error"
    for a, b in zip(alone, mixed, strict=True):
        assert b.outputs[0].finish_reason == "length"
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.stats().num_kv_blocks_used == 0


def test_a_request_that_fails_mid_generation_keeps_its_tokens(llm):
    """The fault can strike after some steps (here: at its first sampled step after a
    chunked prefill of 100 tokens); the others are unaffected and nothing leaks."""
    long_prompt = list(range(20, 120))
    long_prompt[-1] = FAULT
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    alone = _run(llm, PROMPTS[:2], [params] * 2)
    out = _run(llm, [PROMPTS[0], long_prompt, PROMPTS[1]], [params] * 3)
    assert out[1].outputs[0].finish_reason == "error"
    assert [o.outputs[0].token_ids for o in (out[0], out[2])] == \
        [o.outputs[0].token_ids for o in alone]
    assert llm.engine.stats().num_kv_blocks_used == 0


@pytest.mark.parametrize("kwargs,field", [
    ({"stop_token_ids": [10**6], "min_tokens": 2}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": 10**9}, "prompt_logprobs"),
])
def test_parameters_checked_against_the_model(llm, kwargs, field):
    with pytest.raises(ValueError, match=field):
        _run(llm, [PROMPTS[0]], [SamplingParams(max_tokens=3, **kwargs)])
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"top_k": 2.5}, "top_k"), ({"max_tokens": True}, "max_tokens"),
    ({"stop_token_ids": ["x"]}, "stop_token_ids"),
])
def test_non_finite_or_mistyped_values_rejected(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_huge_top_k_means_no_top_k(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    huge = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, top_k=2**70)
    a, b = _run(llm, [PROMPTS[0]] * 2, [greedy, huge])
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
