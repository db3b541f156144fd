"""Speculative decoding against plain decoding and transformers: greedy ids per architecture
(with chunked prefill, prefix-cache hits and preemption), exactly the same seeded samples,
a total-variation bound on unseeded samples, logprobs, stop strings and max_tokens.

Drafts come from the real proposers and from an oracle that knows the right continuation
and spoils some of it, so that full acceptance, partial acceptance and rejection of the
first draft all happen in every run."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from tandem import LLM, SamplingParams
from tandem.spec_decode import Proposer
from tandem.spec_decode.switch import SpecSwitch
from tests.e2e.test_llm_parity import ARCHS, _hf_greedy, _prompts
from tests.model_factory import make_tiny_model

NGRAM = {"method": "ngram", "num_speculative_tokens": 3}


class OracleProposer(Proposer):
    """Proposes the reference continuation of a history (from `refs`, prompt + output
    token lists), spoiling draft `spoil[step % len(spoil)]` (None: none) of its k."""

    def __init__(self, refs: list[list[int]], spoil=(None, 1, 0, None, 2)) -> None:
        self.refs, self.spoil, self.calls = refs, spoil, 0

    def propose(self, request_ids, histories, k):
        out = []
        for h in histories:
            self.calls += 1
            guess: list[int] = []
            for ref in self.refs:
                if len(ref) > len(h) and ref[:len(h)] == list(h):
                    guess = ref[len(h):len(h) + k]
                    break
            bad = self.spoil[self.calls % len(self.spoil)]
            if bad is not None and bad < len(guess):
                guess[bad] = (guess[bad] + 1) % 500
            out.append(guess)
        return out


def _runner(llm: LLM):
    """The runner, with the switch set to always verify every draft (these tests check
    exactness whatever is verified, not the switch's choices: test_spec_switch.py)."""
    llm.engine.scheduler.spec_switch = SpecSwitch(
        llm.engine.config.scheduler.speculative_config.num_speculative_tokens, None)
    return llm.engine.executor.runner


@pytest.mark.parametrize("arch,kw", ARCHS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(ARCHS)])
def test_greedy_with_speculation_matches_transformers(tmp_path, arch, kw):
    path = make_tiny_model(tmp_path, arch, **kw)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts()
    n = 12
    refs = [p + _hf_greedy(hf, p, n) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    for proposer in ("oracle", "ngram"):
        # small pool: preemption; small budget: chunked prefill; shared prefixes: hits
        llm = LLM(path, block_size=4, num_kv_blocks=20, max_num_batched_tokens=16,
                  max_num_seqs=8, max_model_len=64, speculative_config=NGRAM)
        runner = _runner(llm)
        if proposer == "oracle":
            runner.proposer = OracleProposer(refs)
        outs = llm.generate(prompts, params, use_tqdm=False)
        for p, o, ref in zip(prompts, outs, refs):
            assert o.outputs[0].token_ids == ref[len(p):], proposer
            assert o.outputs[0].finish_reason == "length"
        s = llm.engine.stats()
        assert s.num_kv_blocks_used == 0 and not llm.engine.has_unfinished_requests()
        if proposer == "oracle":
            assert s.num_preemptions > 0 and s.prefix_cache_hits > 0
            assert 0 < s.spec_accepted_total < s.spec_drafted_total  # accepts and rejects
            assert s.spec_accepted_per_position[0] > s.spec_accepted_per_position[-1] > 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("spec"), "LlamaForCausalLM")


@pytest.fixture(scope="module")
def pair(tiny):
    """(plain LLM, speculating LLM with an oracle fed by the plain model's greedy runs)."""
    plain = LLM(tiny, max_model_len=128)
    spec = LLM(tiny, max_model_len=128, speculative_config=NGRAM)
    return plain, spec


def _oracle_from(plain: LLM, prompts, n=24) -> OracleProposer:
    outs = plain.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n,
                                                  ignore_eos=True), use_tqdm=False)
    return OracleProposer([p + o.outputs[0].token_ids for p, o in zip(prompts, outs)])


def test_seeded_samples_are_exactly_plain_decodings(pair):
    """Each position's draw depends on (seed, position) only, and verification samples
    every row as plain decoding does: so seeded outputs are identical, token for token,
    whatever was drafted (here: greedy continuations, which temperature 0.8 often keeps)."""
    plain, spec = pair
    prompts = [[5, 9, 14, 3, 77, 21, 8]] * 40
    _runner(spec).proposer = _oracle_from(plain, prompts[:1])
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=s, max_tokens=16,
                             ignore_eos=True) for s in range(40)]
    a = plain.generate(prompts, params, use_tqdm=False)
    before = spec.engine.stats().spec_accepted_total
    b = spec.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert spec.engine.stats().spec_accepted_total > before  # drafts were accepted
    again = spec.generate(prompts, params, use_tqdm=False)  # and reproducible
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in b]


def _tv(a: Counter, b: Counter) -> float:
    n, m = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[t] / n - b[t] / m) for t in set(a) | set(b))


class TableProposer(Proposer):
    """Proposes what a table says follows a history (the most common continuation)."""

    def __init__(self, table: dict[tuple[int, ...], list[int]]) -> None:
        self.table = table

    def propose(self, request_ids, histories, k):
        return [list(self.table.get(tuple(h), []))[:k] for h in histories]


def test_unseeded_samples_follow_the_same_distribution(pair):
    """Total variation between the empirical distributions of the 2nd to 4th sampled
    tokens (drafted, then verified) with and without speculation, over 800 unseeded samples
    each, at temperature 0.1 / top-p 0.9 (the tiny random model is flat: warmer, two
    plain runs already differ by TV 0.25 at 800 samples); temperature 0.25 must be told
    apart. (At 0.1, 2-6 tokens carry the mass; two plain runs differ by 0.02-0.04.)
    The
    drafts are the plain run's most common continuations, so they are often accepted and
    often not."""
    plain, spec = pair
    prompt = [11, 40, 2, 19, 63]

    def run(llm, temperature, n=800):
        sp = SamplingParams(temperature=temperature, top_p=0.9, max_tokens=4, ignore_eos=True)
        return [o.outputs[0].token_ids for o in
                llm.generate([prompt] * n, sp, use_tqdm=False)]

    base = run(plain, 0.1)
    follow: dict[tuple[int, ...], Counter] = {}
    for t in base:
        follow.setdefault(tuple(prompt + t[:1]), Counter())[tuple(t[1:])] += 1
    _runner(spec).proposer = TableProposer({h: list(c.most_common(1)[0][0])
                                            for h, c in follow.items()})
    before = spec.engine.stats()
    spec_out = run(spec, 0.1)
    after = spec.engine.stats()
    accepted = after.spec_accepted_total - before.spec_accepted_total
    drafted = after.spec_drafted_total - before.spec_drafted_total
    assert 0.1 * drafted < accepted < drafted - 20, (accepted, drafted)
    other = run(plain, 0.25)
    for pos in (1, 2, 3):
        p = Counter(t[pos] for t in base)
        same = _tv(p, Counter(t[pos] for t in spec_out))
        diff = _tv(p, Counter(t[pos] for t in other))
        assert same < 0.08, (pos, same, diff)
        assert diff > same + 0.1, (pos, same, diff)  # the test can tell them apart


def test_logprobs_are_the_targets(pair):
    plain, spec = pair
    prompts = [[7, 7, 8, 9, 10, 7, 7, 8], [300, 12, 45]]
    _runner(spec).proposer = _oracle_from(plain, prompts)
    sp = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    a = plain.generate(prompts, sp, use_tqdm=False)
    b = spec.generate(prompts, sp, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert len(y.outputs[0].logprobs) == 10
        for d, e in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert d.keys() == e.keys()
            for t in d:
                assert e[t].logprob == pytest.approx(d[t].logprob, abs=1e-5)
        assert y.outputs[0].cumulative_logprob == pytest.approx(
            x.outputs[0].cumulative_logprob, abs=1e-4)


def test_stop_strings_max_tokens_and_eos_cut_where_plain_decoding_does():
    """The embedded model on code that repeats itself, so that whole runs of drafts are
    accepted: stop strings, stop tokens, EOS and max_tokens land inside accepted runs and
    must cut exactly where one token a step would."""
    plain = LLM(max_model_len=512)
    spec = LLM(max_model_len=512, speculative_config={"method": "ngram",
                                                      "num_speculative_tokens": 5})
    _runner(spec)
    prompt = ("def add(a, b):\n    return a + b\n\n\ndef add3(a, b, c):\n"
              "    return a + b + c\n\n\ndef add4(a, b, c, d):\n")
    tok = plain.get_tokenizer()
    base = plain.generate([prompt], SamplingParams(temperature=0.0, max_tokens=96,
                                                   ignore_eos=True), use_tqdm=False)[0]
    ids = base.outputs[0].token_ids
    cases = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
             for m in (1, 2, 7, 13, 33)]
    cases += [SamplingParams(temperature=0.0, max_tokens=96, stop=[s])
              for s in ("add6", "c + d\n\n\ndef add", "(a, b, c):\n    return")]
    cases += [SamplingParams(temperature=0.0, max_tokens=96, stop=["add7"],
                             include_stop_str_in_output=True)]
    cases += [SamplingParams(temperature=0.0, max_tokens=96, stop_token_ids=[ids[20]]),
              SamplingParams(temperature=0.0, max_tokens=96, min_tokens=30,
                             stop_token_ids=[ids[20]])]
    for sp in cases:
        a = plain.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
        b = spec.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
        assert (b.token_ids, b.text, b.finish_reason, b.stop_reason) == \
            (a.token_ids, a.text, a.finish_reason, a.stop_reason), sp
    s = spec.engine.stats()
    assert s.spec_acceptance_rate > 0.5, s
    assert tok is not None


def test_speculative_config_is_validated(tiny):
    for bad, words in [({"method": "medusa", "num_speculative_tokens": 2}, "method"),
                       ({"method": "ngram"}, "num_speculative_tokens"),
                       ({"method": "ngram", "num_speculative_tokens": 0}, "[1, 16]"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "k": 1}, "unknown"),
                       ("{not json", "JSON"),
                       ({"method": "ngram", "num_speculative_tokens": 2,
                         "synthetic_acceptance_rate": 1.5}, "synthetic")]:
        with pytest.raises(ValueError, match=words.replace("[", r"\[")):
            LLM(tiny, speculative_config=bad)
    with pytest.raises(ValueError, match="bench"):  # synthetic acceptance: benchmarks only
        LLM(tiny, speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                      "synthetic_acceptance_rate": 0.5})


@pytest.mark.parametrize("switch", ["always", "never", "alternate"])
def test_async_engine_speculates_then_pipelines(tiny, switch):
    """With async scheduling on, a speculating step is collected before the next is planned
    (its drafts come from its tokens); once the switch turns speculation off the steps
    pipeline again. Either way the output is plain greedy decoding's."""
    from tandem.spec_decode.switch import StepCosts
    prompts = [[5, 9, 14, 3, 77, 21, 8], [300, 12, 45], list(range(40, 70))]
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(tiny, max_model_len=128).generate(
        prompts, sp, use_tqdm=False)]
    llm = LLM(tiny, max_model_len=128, speculative_config=NGRAM, async_scheduling=True)
    runner = _runner(llm)
    runner.proposer = OracleProposer([p + r for p, r in zip(prompts, ref)])
    if switch == "never":  # verifying rows costs 10x: the switch keeps speculation off
        llm.engine.scheduler.spec_switch = SpecSwitch(3, StepCosts({1: 1e-3, 2: 1e-2}))
    if switch == "alternate":  # every other step verifies drafts but proposes none after
        sw = llm.engine.scheduler.spec_switch
        choose, calls = sw.choose, []

        def alternate(rids, other=0):
            ks, propose = choose(rids, other)
            calls.append(1)
            return ks, propose if len(calls) % 2 else 0
        sw.choose = alternate
    launches = []
    launch = llm.engine.executor.launch
    llm.engine.executor.launch = lambda plan: (launches.append(
        llm.engine._inflight is not None), launch(plan))[1]
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    s = llm.engine.stats()
    if switch == "always":
        assert s.spec_accepted_total > 0
        assert not any(launches)  # every step waited for the one before
    elif switch == "alternate":  # a verifying step is collected even if it proposes nothing
        assert s.spec_accepted_total > 0
    else:
        assert s.spec_drafted_total <= 3  # a few probes at most
        assert sum(launches) > len(launches) // 2  # launched behind a step in flight


def test_served_with_speculation_over_the_openai_client(tmp_path):
    """`tandem serve --speculative-config` on the embedded model (the switch off: always
    verify, so that drafts surely run): greedy completions (one streamed) equal plain
    decoding's, and /metrics counts drafts and accepted tokens."""
    from tandem.assets import default_model_dir
    from tests.e2e.test_server import start_server, stop_server
    prompt = ("def add(a, b):\n    return a + b\n\n\ndef add3(a, b, c):\n"
              "    return a + b + c\n\n\ndef add4(a, b, c, d):\n")
    plain = LLM(max_model_len=512).generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True),
        use_tqdm=False)[0].outputs[0].text
    srv = start_server(default_model_dir(), str(tmp_path / "server.log"), "--speculative-config",
                       '{"method": "ngram", "num_speculative_tokens": 4, '
                       '"auto_switch": false}')
    try:
        client = srv.client()
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt=prompt, max_tokens=60,
                                        temperature=0.0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == plain
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=60,
                                           temperature=0.0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in stream) == plain
        drafted = srv.metric("tandem:spec_decode_num_draft_tokens_total")
        accepted = srv.metric("tandem:spec_decode_num_accepted_tokens_total")
        assert 0 < accepted <= drafted
        assert srv.metric("tandem:spec_decode_num_accepted_tokens_per_pos_total",
                          position="0") > 0
    finally:
        stop_server(srv)


def test_draft_model_on_the_embedded_model(tiny):
    """The embedded draft proposes for the embedded model: greedy output equals plain
    decoding's, its guesses are accepted, its KV pool is sized with the target's; a model
    without a draft of its own must name one."""
    prompt = "def area(width, height):\n    return width * height\n\n\ndef volume("
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    plain = LLM(max_model_len=256).generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    spec = LLM(max_model_len=256, speculative_config={"method": "draft_model",
                                                      "num_speculative_tokens": 4})
    runner = _runner(spec)
    assert runner.proposer.block_bytes > 0
    assert len(runner.proposer._free) == runner.num_blocks  # block for block
    out = spec.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == plain.token_ids
    s = spec.engine.stats()
    assert s.spec_accepted_total > 0.3 * s.spec_drafted_total > 0
    with pytest.raises(ValueError, match="model"):
        LLM(tiny, speculative_config={"method": "draft_model", "num_speculative_tokens": 2})


def test_sampled_draft_model_follows_the_targets_distribution():
    """The embedded draft at temperature 0.7 samples its guesses from q and the p/q rule
    verifies them: the 2nd-4th tokens' distributions with speculation are as close to
    plain decoding's as a second plain run is (total variation, 600 samples each), a
    different temperature is told apart, guesses are both accepted and rejected, and seeded
    runs repeat exactly."""
    prompt = ("def area(width, height):\n    return width * height\n\n\n"
              "def volume(width, height, depth):\n")
    plain = LLM(max_model_len=256)
    spec = LLM(max_model_len=256, speculative_config={"method": "draft_model",
                                                      "num_speculative_tokens": 3})
    _runner(spec)

    def run(llm, temperature, n=600, seed=None):
        sp = [SamplingParams(temperature=temperature, max_tokens=4, ignore_eos=True,
                             seed=None if seed is None else seed + i) for i in range(n)]
        return [o.outputs[0].token_ids for o in llm.generate([prompt] * n, sp,
                                                              use_tqdm=False)]

    a, b = run(plain, 0.7), run(plain, 0.7)
    s = run(spec, 0.7)
    hot = run(plain, 1.3)
    st = spec.engine.stats()
    assert 0 < st.spec_accepted_total < st.spec_drafted_total
    for pos in (1, 2, 3):
        count = lambda runs: Counter(t[pos] for t in runs)  # noqa: E731
        noise = _tv(count(a), count(b))
        assert _tv(count(a), count(s)) < noise + 0.06, (pos, noise)
        assert _tv(count(a), count(hot)) > noise + 0.1, pos  # the test can tell
    assert run(spec, 0.7, n=20, seed=5) == run(spec, 0.7, n=20, seed=5)
