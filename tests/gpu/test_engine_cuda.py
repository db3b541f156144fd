"""The engine on CUDA with the PyTorch attention path: greedy parity with transformers in
float32, and a bfloat16 run with dummy weights. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tandem import LLM, SamplingParams
from tests.model_factory import make_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("arch,kw", [("LlamaForCausalLM", {}),
                                     ("Qwen3ForCausalLM", {"head_dim": 32})])
def test_greedy_parity_on_cuda_float32(tmp_path, arch, kw, async_scheduling):
    path = make_tiny_model(tmp_path, arch, **kw)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    llm = LLM(path, device="cuda", dtype="float32", block_size=4, num_kv_blocks=40,
              max_model_len=64, max_num_batched_tokens=16, async_scheduling=async_scheduling)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41], list(range(100, 130))]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref


def test_bfloat16_dummy_weights_and_memory_profiling(tmp_path):
    path = make_tiny_model(tmp_path, "LlamaForCausalLM")
    llm = LLM(path, load_format="dummy", gpu_memory_utilization=0.3)
    assert llm.engine.runner.dtype == torch.bfloat16
    assert llm.engine.runner.num_blocks > 1000  # sized from free memory, not a default
    outs = llm.generate([[1, 2, 3]] * 8, SamplingParams(temperature=0.7, seed=1, max_tokens=20,
                                                        ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 20 for o in outs)


def test_async_decode_steps_never_wait_on_the_device(tmp_path):
    """Steady-state async decode steps (CUDA graphs) make no synchronizing CUDA call: the
    only wait is collect's event, one step behind, which sync-debug mode does not flag."""
    path = make_tiny_model(tmp_path, "LlamaForCausalLM")
    llm = LLM(path, load_format="dummy", gpu_memory_utilization=0.3)
    engine = llm.engine
    assert engine.async_scheduling and engine.runner.graphs is not None
    for i in range(4):
        engine.add_request(str(i), [1, 2, 3, 4 + i], SamplingParams(
            temperature=0.8 if i % 2 else 0.0, top_p=0.9, seed=i, max_tokens=40,
            ignore_eos=True))
    for _ in range(3):  # prefill and the first decodes (pinned buffers, generators)
        engine.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    while engine.has_unfinished_requests():
        engine.step()


@pytest.mark.parametrize("arch,kw", [
    ("LlamaForCausalLM", {}),
    ("Qwen3MoeForCausalLM", {"hidden_size": 128, "intermediate_size": 256, "num_layers": 3,
                             "moe": {"num_experts": 16, "num_experts_per_tok": 4}})])
def test_one_sequence_prefill_graphs_match_eager(tmp_path, arch, kw):
    """A prefill step of one sequence replays the captured graph of the next prefill size
    (padded rows, chunks after a cached prefix, chunked prompts): the same tokens and prompt
    logprobs as the eager engine, float32."""
    import gc
    path = make_tiny_model(tmp_path, arch, **kw)
    g = torch.Generator().manual_seed(0)
    base = torch.randint(3, 500, (150,), generator=g).tolist()
    prompts = [base[:5], base[:40], base[:32] + [7] * 20, base]
    with_lp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=1)
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    results, calls = {}, []
    for eager in (False, True):
        llm = LLM(path, device="cuda", dtype="float32", max_model_len=256,
                  max_num_batched_tokens=64, enforce_eager=eager, num_kv_blocks=64)
        graphs = llm.engine.executor.runner.graphs
        if eager:
            assert graphs is None
        else:
            assert graphs.prefill_sizes == [16, 32, 64]
            run = graphs._run_prefill
            graphs._run_prefill = lambda inputs: (
                calls.append(inputs.attn_metadata.num_tokens), run(inputs))[1]
        # one at a time, so each prefill step holds one sequence; then again, when their
        # prefixes are cached and the chunks start past them
        results[eager] = ([llm.generate([p], with_lp, use_tqdm=False)[0] for p in prompts]
                          + [llm.generate([p], plain, use_tqdm=False)[0] for p in prompts])
        del llm, graphs
        gc.collect()
        torch.cuda.empty_cache()
    assert 5 in calls and 64 in calls and len(calls) >= 8, calls  # padded, full, chunked
    for a, b in zip(results[False], results[True]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        if a.prompt_logprobs is not None:
            for tok, ea, eb in zip(a.prompt_token_ids[1:], a.prompt_logprobs[1:],
                                   b.prompt_logprobs[1:]):
                assert abs(ea[tok].logprob - eb[tok].logprob) < 1e-4
