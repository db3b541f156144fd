"""tandem models vs transformers: logits of every position through paged attention.

Each case loads a tiny random checkpoint with tandem's loader, runs a batch that mixes a
fresh prefill, a prefill split into two chunks (the split lands mid-block) and decodes
through the paged KV cache, and compares every computed position's logits with
transformers' logits for the whole sequence.
"""

from __future__ import annotations

import random

import pytest
import torch

from tandem.models.loader import load_model
from tests.model_factory import make_attn_metadata, make_tiny_model


BLOCK_SIZE = 4
DEVICES = ["cpu"] + [pytest.param("cuda", marks=pytest.mark.gpu)] * torch.cuda.is_available()
CASES = {
    "llama": dict(architecture="LlamaForCausalLM"),
    "llama-tied": dict(architecture="LlamaForCausalLM", tie_word_embeddings=True),
    "llama-mqa": dict(architecture="LlamaForCausalLM", num_kv_heads=1),
    "llama-bias": dict(architecture="LlamaForCausalLM", attention_bias=True),
    "llama3-rope-scaling": dict(architecture="LlamaForCausalLM", rope_scaling="llama3"),
    "llama-linear-rope": dict(architecture="LlamaForCausalLM", rope_scaling="linear"),
    "mistral": dict(architecture="MistralForCausalLM"),
    "qwen2": dict(architecture="Qwen2ForCausalLM"),
    "qwen2-tied": dict(architecture="Qwen2ForCausalLM", tie_word_embeddings=True),
    "qwen3-head-dim": dict(architecture="Qwen3ForCausalLM", head_dim=32),
    "qwen3-tied-mqa": dict(architecture="Qwen3ForCausalLM", tie_word_embeddings=True,
                           num_kv_heads=1),
}


class PagedSeqs:
    """Just enough of a model runner: token lists, shuffled block tables, one KV pool."""

    def __init__(self, model, num_seqs: int, max_len: int, device: str = "cpu",
                 seed: int = 0) -> None:
        blocks_per_seq = -(-max_len // BLOCK_SIZE)
        pool = list(range(num_seqs * blocks_per_seq + 2))
        random.Random(seed).shuffle(pool)
        self.tables = [pool[i * blocks_per_seq:(i + 1) * blocks_per_seq] for i in range(num_seqs)]
        self.tokens: list[list[int]] = [[] for _ in range(num_seqs)]
        self.model, self.device = model, device
        dtype = next(model.parameters()).dtype
        for layer in model.attention_layers():
            layer.kv_cache = torch.zeros(layer.kv_cache_shape(len(pool), BLOCK_SIZE),
                                         dtype=dtype, device=device)

    def step(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Run seq -> its new tokens; return seq -> logits of those positions."""
        ids, positions, q_lens, s_lens, tables = [], [], [], [], []
        for seq, toks in new_tokens.items():
            start = len(self.tokens[seq])
            self.tokens[seq] += toks
            ids += toks
            positions += range(start, start + len(toks))
            q_lens.append(len(toks))
            s_lens.append(start + len(toks))
            tables.append(self.tables[seq])
        meta = make_attn_metadata(q_lens, s_lens, tables, BLOCK_SIZE, self.device)
        with torch.no_grad():
            hidden = self.model(torch.tensor(ids, device=self.device),
                                torch.tensor(positions, device=self.device), meta)
            logits = self.model.compute_logits(hidden)
        out, row = {}, 0
        for seq, q_len in zip(new_tokens, q_lens):
            out[seq] = logits[row:row + q_len]
            row += q_len
        return out


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    device = next(hf_model.parameters()).device
    with torch.no_grad():
        return hf_model(torch.tensor([tokens], device=device)).logits[0].float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str, device: str, tmp_path) -> None:
    import transformers

    path = make_tiny_model(tmp_path, **CASES[case])
    model = load_model(path, torch.float32, torch.device(device))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf = hf.to(device).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(512) for _ in range(n)] for n in (11, 13, 6)]
    seqs = PagedSeqs(model, num_seqs=3, max_len=24, device=device)

    # Step 1: seq 0 whole, seq 1 first chunk (6 of 13: ends mid-block), seq 2 whole.
    # Step 2: seq 1 second chunk (starts mid-block) batched with decodes of seqs 0 and 2.
    # Steps 3-5: decodes of all three.
    steps = [{0: prompts[0], 1: prompts[1][:6], 2: prompts[2]}]
    got = seqs.step(steps[0])
    for step in range(4):
        new = {seq: [int(logits[-1].argmax())] for seq, logits in got.items() if seq != 1}
        new[1] = prompts[1][6:] if step == 0 else [int(got[1][-1].argmax())]
        for seq, logits in got.items():
            ref = hf_logits(hf, seqs.tokens[seq])[-logits.shape[0]:]
            torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0,
                                       msg=lambda m: f"{case} step {step} seq {seq}: {m}")
        got = seqs.step(new)
    for seq, logits in got.items():
        ref = hf_logits(hf, seqs.tokens[seq])[-logits.shape[0]:]
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_close_to_float32(device: str, tmp_path) -> None:
    path = make_tiny_model(tmp_path, "Qwen3ForCausalLM", head_dim=32)
    prompt = [(i * 37) % 512 for i in range(19)]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        seqs = PagedSeqs(load_model(path, dtype, device), num_seqs=1, max_len=24, device=device)
        out[dtype] = seqs.step({0: prompt})[0].float()
    assert out[torch.bfloat16].dtype == torch.float32
    torch.testing.assert_close(out[torch.bfloat16], out[torch.float32], atol=0.15, rtol=0.05)


def test_model_attributes_for_kv_sizing(tmp_path) -> None:
    path = make_tiny_model(tmp_path, "Qwen3ForCausalLM", head_dim=32, num_kv_heads=1)
    model = load_model(path, torch.float32, "cpu")
    sizes = (model.num_layers, model.num_kv_heads, model.head_dim, model.vocab_size)
    assert sizes == (2, 1, 32, 512)
    layers = model.attention_layers()
    assert len(layers) == 2 and layers[0].kv_cache_shape(10, 16) == (2, 10, 16, 1, 32)
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape == (4 * 32 + 2 * 32, 64)
    with pytest.raises(RuntimeError, match="not bound"):
        model(torch.tensor([1]), torch.tensor([0]), make_attn_metadata([1], [1], [[0]], 16))


def test_unknown_rope_type_is_named() -> None:
    from tandem.layers.rotary import RotaryEmbedding

    with pytest.raises(ValueError, match="'yarn'"):
        RotaryEmbedding(16, 64, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def test_sliding_window_is_exposed(tmp_path) -> None:
    from tandem.models.llama import MistralForCausalLM
    from tandem.models.loader import read_hf_config

    hf = read_hf_config(make_tiny_model(tmp_path, "MistralForCausalLM"))
    assert MistralForCausalLM({**hf, "sliding_window": 4096}).sliding_window is None  # >= max pos
    assert MistralForCausalLM({**hf, "sliding_window": 128}).sliding_window == 128
