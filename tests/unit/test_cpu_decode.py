"""The fused CPU decode step (runner/cpu_decode.py, kernels/cpu/decode_step.c) against the
model's PyTorch forward, its spec: the same logits and the same K/V written, step by step
inside real generations, and the same tokens end to end."""

from __future__ import annotations

import random

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.kernels.cpu import load_library
from tandem.layers.cpu_gemm import pack_panels
from tandem.runner import cpu_decode
from tandem.runner.cpu_decode import CpuDecodeRunner
from tandem.runner.input_batch import ModelInputs
from tests.model_factory import make_attn_metadata, make_tiny_model

needs_kernel = pytest.mark.skipif(load_library() is None, reason="no C compiler")


def _runner(llm: LLM):
    return llm.engine.executor.runner


def _check_every_fused_step(llm: LLM) -> list[int]:
    """Wrap the fused step: each call also runs the reference forward on the same inputs
    and caches, and asserts equal logits and K/V. Returns the list of row counts seen.
    The greedy shortcut (`greedy`, the same native step with the argmax taken inside) is
    turned off, so every step comes through `logits`; test_greedy_steps_* cover it."""
    runner = _runner(llm)
    runner.cpu_decode.greedy = lambda plan, states: None
    fused, model = runner.cpu_decode.logits, runner.model
    caches = [layer.kv_cache for layer in model.attention_layers()]
    seen: list[int] = []

    def checked(inputs: ModelInputs) -> torch.Tensor:
        before = [c.clone() for c in caches]
        got = fused(inputs)
        got_kv = [c.clone() for c in caches]
        for c, b in zip(caches, before):
            c.copy_(b)
        hidden = model(inputs.input_ids, inputs.positions, inputs.attn_metadata)
        want = model.compute_logits(hidden[inputs.logits_indices])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        for g, w in zip(got_kv, caches):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        seen.append(inputs.attn_metadata.num_tokens)
        return got

    runner.cpu_decode.logits = checked
    return seen


@needs_kernel
@pytest.mark.parametrize("tied, intermediate_size, block_size, num_prompts", [
    (True, 128, 16, 1), (False, 100, 16, 3), (True, 96, 1, 8), (False, 128, 32, 11),
    (True, 100, 16, 30)])
def test_fused_step_matches_forward(tmp_path, tied: bool, intermediate_size: int,
                                    block_size: int, num_prompts: int) -> None:
    """Logits and cache writes of every fused step equal the forward's; rows 1..30 (whole
    register tiles of rows and every remainder), context across block boundaries, an
    intermediate size that ends in a partial panel."""
    path = make_tiny_model(tmp_path, tie_word_embeddings=tied, num_heads=8, num_kv_heads=2,
                           head_dim=16, intermediate_size=intermediate_size)
    llm = LLM(path, block_size=block_size, num_kv_blocks=1024 // block_size)
    assert _runner(llm).cpu_decode is not None
    seen = _check_every_fused_step(llm)
    rng = random.Random(num_prompts)
    prompts = [[rng.randrange(1, 512) for _ in range(rng.randint(1, 40))]
               for _ in range(num_prompts)]
    lens = [rng.randint(5, 40) for _ in prompts]
    llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                           for n in lens], use_tqdm=False)
    assert seen and max(seen) == min(num_prompts, cpu_decode.MAX_ROWS)


@needs_kernel
def test_engine_outputs_equal_eager(tmp_path) -> None:
    """Greedy tokens and sampled logprobs equal those of enforce_eager (the forward)."""
    path = make_tiny_model(tmp_path, num_heads=4, num_kv_heads=2, hidden_size=64)
    prompts = ["def fibonacci(n):", "The capital of France", "import torch\n", "for i in"]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=3)
    fused = LLM(path)
    assert _runner(fused).cpu_decode is not None
    eager = LLM(path, enforce_eager=True)
    assert _runner(eager).cpu_decode is None
    for a, b in zip(fused.generate(prompts, params, use_tqdm=False),
                    eager.generate(prompts, params, use_tqdm=False)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            for tok in la:
                assert abs(la[tok].logprob - lb[tok].logprob) < 1e-4


@needs_kernel
@pytest.mark.parametrize("kwargs", [
    {"architecture": "Qwen2ForCausalLM"}, {"architecture": "Qwen3ForCausalLM"},
    {"quantization": "int8"}])
def test_not_built_for_what_it_does_not_cover(tmp_path, kwargs: dict) -> None:
    kwargs = dict(kwargs)
    quant = kwargs.pop("quantization", None)
    llm = LLM(make_tiny_model(tmp_path, **kwargs), quantization=quant)
    assert _runner(llm).cpu_decode is None


@needs_kernel
def test_packed_weights_move_into_one_mapping(tmp_path) -> None:
    """The fused step's runner moves the linears' packed panels into its huge-page mapping,
    values unchanged: the panels of the eager model's weights (the same checkpoint)."""
    import ctypes
    path = make_tiny_model(tmp_path, tie_word_embeddings=True)
    runner, eager = _runner(LLM(path)), _runner(LLM(path, enforce_eager=True))
    arena = runner.cpu_decode._arena
    assert arena is not None
    start = ctypes.addressof(ctypes.c_char.from_buffer(arena))
    width = load_library().tandem_panel_width()
    want = dict(eager.model.named_modules())
    moved = 0
    for name, module in runner.model.named_modules():
        packed = getattr(module, "packed", None)
        if packed is None:
            continue
        assert start <= packed.tensor.data_ptr() < start + len(arena), name
        expect = pack_panels(want[name].weight, width, packed.nseg)
        assert torch.equal(packed.tensor, expect), name
        moved += 1
    assert moved == 4 * len(runner.model.model.layers) + 1  # and the LM head
    assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight


def test_off_without_cpu_kernels(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TANDEM_CPU_KERNELS", "0")
    assert _runner(LLM(make_tiny_model(tmp_path))).cpu_decode is None


def _generate_both_ways(llm: LLM, prompts: list, params) -> tuple[list, list, list[int]]:
    """Token ids of `prompts` with the greedy shortcut (CpuDecodeRunner.greedy) on, then off
    (the general path: standing or built inputs, `logits`, the Sampler's argmax), and the
    row counts of the steps the shortcut took."""
    cpu = _runner(llm).cpu_decode
    greedy = cpu.greedy
    rows: list[int] = []

    def counted(plan, states):
        ids = greedy(plan, states)
        if ids is not None:
            rows.append(len(ids))
        return ids

    cpu.greedy = counted
    fast = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    cpu.greedy = lambda plan, states: None
    general = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    cpu.greedy = greedy
    return fast, general, rows


@needs_kernel
@pytest.mark.parametrize("block_size, num_prompts",
                         [(16, 1), (1, 3), (16, 8), (32, 11), (16, 29)])
def test_greedy_steps_match_the_general_path(tmp_path, block_size: int,
                                             num_prompts: int) -> None:
    """The greedy shortcut (step and argmax in one native call, inputs in standing
    buffers) picks the tokens of the general path and of the eager forward: rows 1..29,
    requests joining and leaving the standing rows, tables across block boundaries."""
    path = make_tiny_model(tmp_path, num_heads=4, num_kv_heads=2)
    llm = LLM(path, block_size=block_size, num_kv_blocks=2048 // block_size)
    rng = random.Random(num_prompts)
    prompts = [[rng.randrange(1, 512) for _ in range(rng.randint(1, 40))]
               for _ in range(num_prompts)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(5, 60), ignore_eos=True)
              for _ in prompts]
    fast, general, rows = _generate_both_ways(llm, prompts, params)
    assert fast == general
    assert rows and max(rows) <= cpu_decode.MAX_ROWS
    assert num_prompts > cpu_decode.MAX_ROWS or max(rows) == num_prompts
    eager = LLM(path, block_size=block_size, enforce_eager=True)
    assert fast == [o.outputs[0].token_ids
                    for o in eager.generate(prompts, params, use_tqdm=False)]


@needs_kernel
@pytest.mark.parametrize("tweak", ["zero", "nan", "nan_late", "tie_late"])
def test_greedy_argmax_follows_torch_argmax(tmp_path, tweak: str) -> None:
    """Ties and NaN logits: the native argmax keeps torch.argmax's rule (the first maximum,
    a NaN the largest), also where the candidates lie in different threads' shares of the
    vocabulary. The LM head's rows are edited, then packed again in place, where both
    paths read them."""
    path = make_tiny_model(tmp_path, num_heads=4, num_kv_heads=2, vocab_size=512)
    llm = LLM(path)
    head = _runner(llm).model.lm_head
    weight = head.weight.detach().clone()
    vocab = weight.shape[0]
    with torch.no_grad():
        if tweak == "zero":  # every logit 0: token 0
            weight.zero_()
        elif tweak == "nan":  # the first NaN wins
            weight[[7, vocab - 3]] = float("nan")
        elif tweak == "nan_late":  # a NaN in the last thread's share only
            weight[vocab - 3] = float("nan")
        else:  # the same largest logit in the first and the last share
            weight[vocab - 2] = weight[2] = weight[2] * 100.0
        head.packed.tensor.copy_(pack_panels(weight, head.packed.tensor.shape[-1]))
    prompts = [[3, 5, 8, 13], [21, 34], [55]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    fast, general, rows = _generate_both_ways(llm, prompts, params)
    assert rows and fast == general
    if tweak == "zero":
        assert all(t == 0 for ids in fast for t in ids[1:])
    elif tweak.startswith("nan"):
        assert all(t == (7 if tweak == "nan" else vocab - 3) for ids in fast for t in ids[1:])


@needs_kernel
def test_greedy_shortcut_only_for_plain_greedy_rows(tmp_path) -> None:
    """Rows that need more than an argmax (logprobs, a penalty, sampling, a min_tokens ban
    on EOS) send their whole step through the general path; the tokens stay the same."""
    path = make_tiny_model(tmp_path, num_heads=4, num_kv_heads=2)
    llm = LLM(path)
    prompts = [[3, 5, 8, 13], [21, 34, 55]]
    plain = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    for other, shortcut in [
            (SamplingParams(temperature=0.0, max_tokens=10, logprobs=2), False),
            (SamplingParams(temperature=0.0, max_tokens=10, repetition_penalty=1.2), False),
            (SamplingParams(temperature=0.8, max_tokens=10, seed=1), False),
            (SamplingParams(temperature=0.0, max_tokens=10, min_tokens=10), False),
            (SamplingParams(temperature=0.0, max_tokens=10, min_tokens=3), True)]:
        fast, general, rows = _generate_both_ways(llm, prompts, [plain, other])
        assert fast == general
        if shortcut:  # min_tokens=3 bans EOS from output tokens 2 and 3 only: then both rows
            assert 2 in rows
        else:
            assert not rows


@needs_kernel
def test_greedy_shortcut_under_async_scheduling(tmp_path) -> None:
    """With async scheduling a decode's input is the token still in flight: such steps
    take the general path (the shortcut needs every input on the host), tokens unchanged."""
    path = make_tiny_model(tmp_path, num_heads=4, num_kv_heads=2)
    prompts = [[3, 5, 8, 13], [21, 34, 55], [89]]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    sync = LLM(path).generate(prompts, params, use_tqdm=False)
    pipelined = LLM(path, async_scheduling=True)
    assert _runner(pipelined).cpu_decode is not None
    got = pipelined.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in sync]


def test_can_run_only_plain_decode_rows() -> None:
    def inputs(query_lens, seq_lens, counts, prompt_lp=()):
        meta = make_attn_metadata(query_lens, seq_lens, [[0, 1, 2]] * len(seq_lens), 16)
        t = sum(query_lens)
        ids = torch.zeros(t, dtype=torch.int64)
        logits_rows = torch.arange(sum(counts) + sum(c for _, _, c in prompt_lp))
        return ModelInputs(ids, ids, meta, list(range(len(counts))), logits_rows,
                           list(prompt_lp), sample_counts=counts)
    can_run = CpuDecodeRunner.can_run
    assert can_run(None, inputs([1, 1], [5, 9], [1, 1]))
    assert can_run(None, inputs([1] * 8, [5] * 8, [1] * 8))
    n = cpu_decode.MAX_ROWS
    assert can_run(None, inputs([1] * n, [5] * n, [1] * n))
    assert not can_run(None, inputs([1] * (n + 1), [5] * (n + 1), [1] * (n + 1)))
    assert not can_run(None, inputs([3, 1], [5, 9], [1, 1]))  # a prefill chunk
    assert can_run(None, inputs([1, 1], [5, 6], [2]))  # verify rows of one sequence
    assert not can_run(None, inputs([1], [5], [1], [(0, 1, 1)]))  # prompt logprobs


@needs_kernel
def test_speculative_verify_steps_match_forward(tmp_path) -> None:
    """Verify rows (one sequence's drafts as one-token queries, each attending to the K/V
    the rows before it wrote in the same step) through the fused step: every step checked
    against the forward, and the tokens those of plain decoding."""
    path = make_tiny_model(tmp_path, num_heads=4, num_kv_heads=2)
    text = "def fibonacci(n):\n    return n " * 6
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    spec = LLM(path, num_kv_blocks=64, speculative_config={
        "method": "ngram", "num_speculative_tokens": 3})
    seen = _check_every_fused_step(spec)
    got = spec.generate([text], params, use_tqdm=False)[0].outputs[0].token_ids
    want = LLM(path, enforce_eager=True).generate([text], params,
                                                  use_tqdm=False)[0].outputs[0].token_ids
    assert got == want
    assert max(seen) > 1  # some steps verified drafts
