"""The offline API's contract: bad input, seeds, n > 1, stop conditions, chat, abort, stats."""

from __future__ import annotations

import dataclasses

import pytest

from tandem import LLM, SamplingParams
from tests.model_factory import make_tiny_model


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(tmp_path_factory, request):
    """Every contract holds with async scheduling too (each step planned one ahead)."""
    path = make_tiny_model(tmp_path_factory.mktemp("m"), "LlamaForCausalLM")
    return LLM(path, max_model_len=128, max_num_batched_tokens=64,
               async_scheduling=request.param)


GOOD = [5, 6, 7, 8]


@pytest.mark.parametrize("prompt,params,field", [
    ("", SamplingParams(), "prompt"),
    ([], SamplingParams(), "prompt"),
    ([1] * 128, SamplingParams(), "max_model_len"),
    ([1, 2, 99999], SamplingParams(), "prompt_token_ids"),
    ([1, 2, -1], SamplingParams(), "prompt_token_ids"),
])
def test_bad_prompt_raises_and_engine_keeps_serving(llm, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([GOOD, prompt], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # nothing half-queued
    out = llm.generate([GOOD], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.1}, "temperature"), ({"top_k": -5}, "top_k"),
    ({"n": 0}, "n"), ({"min_p": 2.0}, "min_p"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_seeded_sampling_reproducible_in_any_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=16, ignore_eos=True)
    a = llm.generate([GOOD], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [[i + 3, i + 4, i + 5] for i in range(9)]
    mixed = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 9 + [params]
    b = llm.generate(others + [GOOD], mixed, use_tqdm=False)[-1].outputs[0].token_ids
    assert a == b
    c = llm.generate([GOOD], SamplingParams(temperature=1.0, top_p=0.95, seed=43, max_tokens=16,
                                            ignore_eos=True), use_tqdm=False)
    assert c[0].outputs[0].token_ids != a


def test_n_samples_distinct_and_seeded(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    out = llm.generate(GOOD, params, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    seqs = [tuple(o.token_ids) for o in out.outputs]
    assert len(set(seqs)) > 1 and all(len(s) == 12 for s in seqs)
    again = llm.generate(GOOD, params, use_tqdm=False)[0]
    assert [tuple(o.token_ids) for o in again.outputs] == seqs
    # negative seeds too (vLLM takes any 64-bit seed), reproducible and their own stream
    neg = SamplingParams(n=2, temperature=1.0, seed=-7, max_tokens=12, ignore_eos=True)
    a, b = (llm.generate(GOOD, neg, use_tqdm=False)[0] for _ in range(2))
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert tuple(a.outputs[0].token_ids) not in seqs


def test_stop_strings_across_tokens_and_stop_token_ids(llm):
    base = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    full = llm.generate(GOOD, base, use_tqdm=False)[0].outputs[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]  # likely spans a token boundary
    out = llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                            stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    out = llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                            stop=[stop], include_stop_str_in_output=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop) + len(stop)]
    tok = full.token_ids[5]
    out = llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                            stop_token_ids=[tok]), use_tqdm=False)[0].outputs[0]
    k = full.token_ids.index(tok)
    assert out.token_ids == full.token_ids[: k + 1]
    assert out.finish_reason == "stop" and out.stop_reason == tok

    def text_of(n):  # the greedy text of the first n tokens
        return llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    # the stop token's id is in the output, its text is not (vLLM's), unless asked for
    assert out.text == text_of(k) != text_of(k + 1)
    out = llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                            stop_token_ids=[tok], include_stop_str_in_output=True),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == text_of(k + 1)
    # min_tokens holds back stop strings too: the early match is past by then
    out = llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                            stop=[stop], min_tokens=20),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= 20 and out.text.startswith(text[: text.index(stop) + 1])
    out = llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                            stop_token_ids=[tok], min_tokens=30),
                       use_tqdm=False)[0].outputs[0]
    assert tok not in out.token_ids[:30]


def test_logit_bias(llm):
    base = dict(temperature=0.0, max_tokens=6, ignore_eos=True)
    full = llm.generate(GOOD, SamplingParams(**base), use_tqdm=False)[0].outputs[0]
    out = llm.generate(GOOD, SamplingParams(**base, logit_bias={5: 100.0}),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [5] * 6
    out = llm.generate(GOOD, SamplingParams(**base, logprobs=0,
                                            logit_bias={full.token_ids[0]: -100.0}),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids[0] != full.token_ids[0]
    # the logprobs returned are the model's own: the banned argmax ranks above the choice
    assert out.logprobs[0][out.token_ids[0]].logprob < 0
    with pytest.raises(ValueError, match="logit_bias"):
        llm.generate(GOOD, SamplingParams(**base, logit_bias={10**9: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={5: 500.0})
    out = llm.generate(GOOD, SamplingParams(**base, allowed_token_ids=[9, 11]),
                       use_tqdm=False)[0].outputs[0]
    assert set(out.token_ids) <= {9, 11}
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate(GOOD, SamplingParams(**base, allowed_token_ids=[10**9]), use_tqdm=False)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])


def test_eos_stops_unless_ignored(llm):
    eos = next(iter(llm.engine.eos_token_ids))
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    full = llm.generate(GOOD, params, use_tqdm=False)[0].outputs[0].token_ids
    # Make EOS the greedy pick via a logit-free route: treat the 3rd token as EOS.
    llm.engine.eos_token_ids = frozenset({full[2]})
    try:
        out = llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=30),
                           use_tqdm=False)[0].outputs[0]
        assert out.token_ids == full[:3] and out.finish_reason == "stop"
        assert out.stop_reason is None  # EOS: no stop_reason, and no text (vLLM's)
        assert out.text == llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=2),
                                        use_tqdm=False)[0].outputs[0].text
        out = llm.generate(GOOD, SamplingParams(temperature=0.0, max_tokens=30, min_tokens=10),
                           use_tqdm=False)[0].outputs[0]
        assert full[2] not in out.token_ids[:10]
    finally:
        llm.engine.eos_token_ids = frozenset({eos})


def test_streamed_text_concatenates_to_one_shot_decode(llm):
    eng = llm.engine
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=60, ignore_eos=True,
                            skip_special_tokens=False)
    eng.add_request("s", "def hello(", params)
    pieces, sent = [], 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            text = out.outputs[0].text
            pieces.append(text[sent:])
            sent = len(text)
            final = out
    ids = final.outputs[0].token_ids
    assert "".join(pieces) == eng.tokenizer.decode(ids, skip_special_tokens=False)


def test_chat_and_string_prompts(llm):
    msgs = [{"role": "user", "content": "Hello"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    assert out.prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompt_token_ids == tok.encode(out.prompt)
    s = llm.generate("The quick brown", SamplingParams(max_tokens=2, ignore_eos=True),
                     use_tqdm=False)[0]
    assert s.prompt == "The quick brown" and s.prompt_token_ids == tok.encode("The quick brown")


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_chat_tools_reach_the_template(llm):
    template = ("{% for t in tools or [] %}[tool {{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    msgs = [{"role": "user", "content": "Weather?"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False,
                   chat_template=template, tools=TOOLS)[0]
    assert out.prompt == "[tool get_weather]user: Weather?\n"
    plain = llm.chat(msgs, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False,
                     chat_template=template)[0]
    assert plain.prompt == "user: Weather?\n"


def test_abort_frees_blocks_and_metrics(llm):
    eng = llm.engine
    eng.add_request("a", list(range(3, 60)), SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    assert eng.stats().num_kv_blocks_used > 0
    out = eng.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert eng.stats().num_kv_blocks_used == 0 and not eng.has_unfinished_requests()
    done = llm.generate(GOOD, SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    m = done.metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time
    assert done.outputs[0].finish_reason == "length"


def test_max_tokens_none_runs_to_max_model_len(llm):
    out = llm.generate([GOOD], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(GOOD) + len(out.token_ids) == 128 and out.finish_reason == "length"


def test_colliding_request_ids_are_refused_without_side_effects(llm):
    eng = llm.engine
    eng.add_request("x", GOOD, SamplingParams(n=2, max_tokens=3, ignore_eos=True))
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request("0_x", GOOD, SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request("x", GOOD, SamplingParams(max_tokens=3))
    done = []
    while eng.has_unfinished_requests():
        done += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in done] == ["x"]
    assert [len(c.token_ids) for c in done[0].outputs] == [3, 3]


def test_seed_out_of_range_is_a_value_error():
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**70)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=-2**63 - 1)


def test_async_scheduling_plans_one_step_ahead(llm):
    """With async scheduling, decodes are planned before their input token is known (and
    filled in on the device); without it, never. Outputs match the other mode's (above)."""
    plans = []
    launch = llm.engine.runner.launch

    def spy(plan):
        plans.append(plan)
        return launch(plan)

    llm.engine.runner.launch = spy
    try:
        outs = llm.generate([[5, 6, 7], [9, 10, 11, 12]],
                            SamplingParams(max_tokens=6, ignore_eos=True), use_tqdm=False)
    finally:
        del llm.engine.runner.launch
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]
    inflight = sum(s.inflight_input for p in plans for s in p.seqs)
    assert inflight == (10 if llm.engine.async_scheduling else 0)  # 5 decodes per request
    # The 6th token ends each request by length: never scheduled past it.
    assert sum(s.sample for p in plans for s in p.seqs) == 12


def test_delta_outputs_add_up_to_the_cumulative_ones(llm):
    """RequestOutputKind.DELTA (the server's): each output holds only the new text, tokens
    and logprobs; concatenated, and merged as a slow consumer would, they equal the final
    output of the same request."""
    from tandem.request import RequestOutputKind
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2,
                            stop=["zzzz"])  # a stop string makes the detokenizer hold back
    final = llm.generate([GOOD], params, use_tqdm=False)[0].outputs[0]
    engine = llm.engine
    engine.add_request("d", GOOD, dataclasses.replace(params,
                                                      output_kind=RequestOutputKind.DELTA))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [o for o in engine.step() if o.request_id == "d"]
    assert len(deltas) >= 10 and all(o.delta for o in deltas)
    text = "".join(o.outputs[0].text for o in deltas)
    ids = [t for o in deltas for t in o.outputs[0].token_ids]
    lps = [lp for o in deltas for lp in o.outputs[0].logprobs]
    assert (text, ids, lps) == (final.text, final.token_ids, final.logprobs)
    merged = deltas[0]
    for o in deltas[1:]:
        merged = merged.merge(o)
    c = merged.outputs[0]
    assert (c.text, c.token_ids, c.logprobs, c.finish_reason) == \
        (final.text, final.token_ids, final.logprobs, "length")
    assert c.cumulative_logprob == pytest.approx(final.cumulative_logprob)


def test_generation_config_sets_the_default_sampling(tmp_path):
    """With no SamplingParams, LLM.generate uses the model's generation_config.json (as
    vLLM does); generation_config="vllm" turns that off."""
    import json
    path = make_tiny_model(tmp_path / "m", "LlamaForCausalLM")
    with open(f"{path}/generation_config.json") as f:
        gen = json.load(f)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({**gen, "max_new_tokens": 3, "temperature": 0.0}, f)
    llm = LLM(path, max_model_len=128)
    a, b = (llm.generate([GOOD], use_tqdm=False)[0].outputs[0] for _ in range(2))
    assert len(a.token_ids) <= 3 and a.token_ids == b.token_ids
    plain = LLM(path, max_model_len=128, generation_config="vllm")
    assert plain.engine.inputs.default_sampling_params() == SamplingParams()


def test_detokenize_false_returns_token_ids_only(llm):
    kw = dict(max_tokens=4, ignore_eos=True, logprobs=1, temperature=0.0)
    plain = llm.generate(GOOD, SamplingParams(**kw), use_tqdm=False)[0].outputs[0]
    bare = llm.generate(GOOD, SamplingParams(detokenize=False, **kw),
                        use_tqdm=False)[0].outputs[0]
    assert bare.token_ids == plain.token_ids and len(bare.token_ids) == 4
    assert bare.text == "" and plain.text == llm.get_tokenizer().decode(plain.token_ids)
    assert all(lp.decoded_token is None for pos in bare.logprobs for lp in pos.values())
    assert all(lp.decoded_token is not None for pos in plain.logprobs for lp in pos.values())


def test_vllm_sampling_fields_taken_or_refused_clearly():
    assert SamplingParams(extra_args={}).extra_args == {}  # nothing asked: taken
    for kw, field in [({"detokenize": False, "stop": ["x"]}, "detokenize"),
                      ({"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
                      ({"extra_args": {"k": 1}}, "extra_args"), ({"detokenize": 0}, "detokenize")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw)


def test_bad_words_are_never_generated(llm):
    """A word of one token never appears; a word of two tokens never completes (its last
    token is banned right after its first), with n > 1 and with async scheduling too."""
    tok = llm.get_tokenizer()
    kw = dict(max_tokens=12, ignore_eos=True, temperature=0.0)
    free = llm.generate(GOOD, SamplingParams(**kw), use_tqdm=False)[0].outputs[0].token_ids
    one = tok.decode([free[0]])  # the first greedy token: certainly generated without a ban
    assert one.strip() and tok.encode(one.lstrip(), add_special_tokens=False) == [free[0]]
    out = llm.generate(GOOD, SamplingParams(bad_words=[one], n=2, seed=1, **kw),
                       use_tqdm=False)[0].outputs
    for o in out:
        assert free[0] not in o.token_ids and len(o.token_ids) == 12
    # a two-token "word" the free run produces, whose text encodes back to those tokens
    at = next(i for i in range(1, len(free) - 1)
              if tok.encode(tok.decode(free[i:i + 2]).lstrip(), add_special_tokens=False)
              == free[i:i + 2] and free[i] not in free[:i])
    pair, word = free[at:at + 2], tok.decode(free[at:at + 2])
    banned = llm.generate(GOOD, SamplingParams(bad_words=[word], **kw),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert banned[:at + 1] == free[:at + 1] and banned[at + 1] != free[at + 1]
    assert all(banned[i:i + 2] != pair for i in range(len(banned) - 1))
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words="word")
