"""LLM.generate against transformers: greedy ids and prompt logprobs, per architecture, with a
small token budget (chunked prefill), shared prefixes (prefix-cache hits) and a KV pool small
enough to force preemption."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tandem import LLM, SamplingParams
from tests.model_factory import make_tiny_model

ARCHS = [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", {"tie_word_embeddings": True, "num_kv_heads": 1}),
    ("LlamaForCausalLM", {"rope_scaling": "llama3", "num_kv_heads": 4}),
    ("MistralForCausalLM", {}),
    ("Qwen2ForCausalLM", {}),
    ("Qwen3ForCausalLM", {"head_dim": 32}),
    ("MixtralForCausalLM", {}),
    # a dense layer among the sparse ones; the shared expert and its gate; raw top-k weights
    ("Qwen2MoeForCausalLM", {"moe": {"mlp_only_layers": [1]}}),
    ("Qwen3MoeForCausalLM", {"head_dim": 32, "moe": {"num_experts": 8,
                                                     "num_experts_per_tok": 3}}),
]
MAX_TOKENS = 12


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 500, (21,), generator=g).tolist()
    own = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (1, 5, 9, 30, 3, 17)]
    return [shared + own[0], shared + own[1], own[2], shared + own[3], own[4], own[5],
            shared[:8]]


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    # Like ignore_eos: EOS may be generated but does not stop (min_new_tokens would ban it).
    hf.generation_config.eos_token_id = None
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("arch,kw", ARCHS, ids=[f"{a}-{i}" for i, (a, _) in enumerate(ARCHS)])
def test_greedy_and_prompt_logprobs_match_transformers(tmp_path, arch, kw, async_scheduling):
    path = make_tiny_model(tmp_path, arch, **kw)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = _prompts()
    # 7 requests need up to 13 blocks each at the end; 24 blocks of 4 tokens force preemption.
    # async: each step is planned while the previous one is still in flight (as on CUDA).
    llm = LLM(path, block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=8,
              max_model_len=64, async_scheduling=async_scheduling)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.prompt_token_ids == p
        assert o.outputs[0].token_ids == _hf_greedy(hf, p, MAX_TOKENS)
        assert o.outputs[0].finish_reason == "length"
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0, "the pool was meant to force preemption"
    assert stats.prefix_cache_hits > 0, "shared prefixes were meant to hit the cache"
    assert stats.num_kv_blocks_used == 0 and not llm.engine.has_unfinished_requests()

    # Prompt logprobs: every position against transformers' log-softmax.
    lp_params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3)
    lp_outs = llm.generate(prompts[:4], lp_params, use_tqdm=False)
    for p, o in zip(prompts[:4], lp_outs):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].log_softmax(-1)
        assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(p)
        for i in range(1, len(p)):
            entry = o.prompt_logprobs[i]
            assert entry[p[i]].logprob == pytest.approx(ref[i - 1, p[i]].item(), abs=1e-4)
            assert entry[p[i]].rank == int((ref[i - 1] > ref[i - 1, p[i]]).sum()) + 1
            top = ref[i - 1].topk(3)
            for tok, val in zip(top.indices.tolist(), top.values.tolist()):
                assert entry[tok].logprob == pytest.approx(val, abs=1e-4)


def test_batch_invariance_greedy(tmp_path):
    path = make_tiny_model(tmp_path, "Qwen2ForCausalLM")
    llm = LLM(path, max_num_batched_tokens=64)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 500, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 60, (32,), generator=g)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    batch = llm.generate(prompts, params, use_tqdm=False)
    for i in (0, 7, 31):
        alone = llm.generate([prompts[i]], params, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == batch[i].outputs[0].token_ids


def test_generation_logprobs_match_transformers(tmp_path):
    path = make_tiny_model(tmp_path, "LlamaForCausalLM")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(path)
    prompt = [5, 17, 200, 31, 9]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, logprobs=2,
                                                ignore_eos=True), use_tqdm=False)[0].outputs[0]
    seq = prompt + out.token_ids
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0].log_softmax(-1)
    assert len(out.logprobs) == 4
    for j, tok in enumerate(out.token_ids):
        row = ref[len(prompt) - 1 + j]
        assert out.logprobs[j][tok].logprob == pytest.approx(row[tok].item(), abs=1e-4)
        assert set(out.logprobs[j]) == {tok} | set(row.topk(2).indices.tolist())
        # vLLM's Logprob: the rank in the whole vocabulary, and the token's text
        for t, entry in out.logprobs[j].items():
            assert entry.rank == int((row > row[t]).sum()) + 1
            assert entry.decoded_token == llm.get_tokenizer().decode(
                [t], skip_special_tokens=False)
    assert out.cumulative_logprob == pytest.approx(sum(d[t].logprob for d, t in
                                                       zip(out.logprobs, out.token_ids)))
