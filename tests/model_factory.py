"""Tiny random Hugging Face checkpoints (model + tokenizer) for tests. Nothing is downloaded.

    path = make_tiny_model(tmp_path, "Qwen3ForCausalLM", head_dim=32)
    # path/: config.json, model.safetensors, generation_config.json,
    #        tokenizer.json, tokenizer_config.json (ChatML-style chat_template)

The tokenizer is a byte-level BPE trained in-process (once, then cached) on a small built-in
English + Python corpus, to exactly the model's vocab size; "<|endoftext|>" is its only
special token and serves as eos and bos. Weights are seeded: matrices ~ N(0, weight_std),
norm weights ~ N(1, 0.1), biases ~ N(0, weight_std), so every tensor matters in a parity test.

`make_attn_metadata` builds the AttentionMetadata a model runner would, for hand-made
batches in tests.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from typing import Any

import torch

from tandem.layers.attention_metadata import AttentionMetadata

EOS_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with "
    "a single step. The weather today is sunny with a light breeze from the west.",
    "Language models predict the next token from the tokens that came before. An inference "
    "engine schedules requests, batches their tokens, and keeps keys and values in a cache.",
    "Once upon a time there was a little house at the edge of the forest. Every morning the "
    "children walked to school, and every evening they came home and told stories.",
    "The capital of France is Paris. The capital of Japan is Tokyo. Water boils at one "
    "hundred degrees Celsius at sea level. There are seven days in a week.",
    "Please write a short poem about the sea. Hello, how are you? I am fine, thank you. "
    "What is your name? My name is Tandem and I answer questions.",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) "
    "+ fibonacci(n - 2)\n",
    "import torch\n\nclass Model(torch.nn.Module):\n    def __init__(self, hidden_size):\n"
    "        super().__init__()\n        self.linear = torch.nn.Linear(hidden_size, hidden_size)\n"
    "\n    def forward(self, x):\n        return self.linear(x)\n",
    "for i in range(10):\n    print(f\"value {i} squared is {i * i}\")\nresult = [x for x in "
    "items if x is not None]\nwith open('data.json') as f:\n    data = json.load(f)\n",
    "numbers = {'one': 1, 'two': 2, 'three': 3}\nwhile True:\n    try:\n        break\n"
    "    except ValueError as error:\n        raise RuntimeError(str(error))\n",
    "Scheduling decides which requests run in each step; the block manager hands out fixed "
    "size blocks of memory, and the prefix cache shares blocks between identical prompts.",
    "0123456789 + - * / = < > ( ) [ ] { } : ; , . ! ? ' \" # @ $ % ^ & | ~ `",
]


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int, extra_special_tokens: tuple[str, ...] = ()) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  special_tokens=[EOS_TOKEN, *extra_special_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


MOE_DEFAULTS: dict[str, dict[str, Any]] = {
    "MixtralForCausalLM": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "Qwen2MoeForCausalLM": {"num_experts": 4, "num_experts_per_tok": 2,
                            "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48,
                            "norm_topk_prob": False, "decoder_sparse_step": 1,
                            "mlp_only_layers": []},
    "Qwen3MoeForCausalLM": {"num_experts": 4, "num_experts_per_tok": 2,
                            "moe_intermediate_size": 32, "norm_topk_prob": True,
                            "decoder_sparse_step": 1, "mlp_only_layers": []},
}


def _hf_config(architecture: str, **kw: Any):
    import transformers

    cls = {"LlamaForCausalLM": transformers.LlamaConfig,
           "MistralForCausalLM": transformers.MistralConfig,
           "Qwen2ForCausalLM": transformers.Qwen2Config,
           "Qwen3ForCausalLM": transformers.Qwen3Config,
           "MixtralForCausalLM": transformers.MixtralConfig,
           "Qwen2MoeForCausalLM": transformers.Qwen2MoeConfig,
           "Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig}[architecture]
    if architecture != "LlamaForCausalLM":
        kw.update(sliding_window=None)
    if architecture.startswith("Qwen"):
        kw.update(use_sliding_window=False)
    return cls(architectures=[architecture], **kw)


def make_tiny_model(out_dir: str | os.PathLike | None = None,
                    architecture: str = "LlamaForCausalLM", *,
                    tie_word_embeddings: bool = False, head_dim: int | None = None,
                    num_kv_heads: int = 2, rope_scaling: str | dict | None = None,
                    hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                    intermediate_size: int = 128, vocab_size: int = 512,
                    max_position_embeddings: int = 512, rope_theta: float = 10000.0,
                    attention_bias: bool = False, weight_std: float = 0.1,
                    seed: int = 0, extra_special_tokens: tuple[str, ...] = (),
                    moe: dict[str, Any] | None = None) -> str:
    """Write a tiny random float32 checkpoint + tokenizer; return its directory.

    moe: the mixture-of-experts fields of the config, for Mixtral / Qwen2-MoE / Qwen3-MoE
    (defaults: 4 experts, top 2, expert size 32, Qwen2-MoE's shared expert 48).

    rope_scaling: None, "llama3" (factor 8, original 64 positions, so scaling bites even in
    a short test), "linear" (factor 2), or a full HF dict.
    extra_special_tokens: more special tokens after EOS (e.g. FIM tokens), inside vocab_size.
    """
    import transformers

    out_dir = str(out_dir) if out_dir is not None else tempfile.mkdtemp(prefix="tandem-tiny-")
    os.makedirs(out_dir, exist_ok=True)
    tokenizer_json = _tokenizer_json(vocab_size, tuple(extra_special_tokens))
    eos_id = json.loads(tokenizer_json)["model"]["vocab"][EOS_TOKEN]
    if rope_scaling == "llama3":
        rope_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    elif rope_scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": 2.0}
    rope = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    extra = {"head_dim": head_dim} if head_dim is not None else {}
    if architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        extra["attention_bias"] = attention_bias
    if architecture in MOE_DEFAULTS:
        extra.update({**MOE_DEFAULTS[architecture], **(moe or {})})
    config = _hf_config(
        architecture, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size, vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings, rope_parameters=rope,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=eos_id, eos_token_id=eos_id,
        rms_norm_eps=1e-6, dtype="float32", **extra)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            mean = 1.0 if "norm" in name else 0.0
            std = 0.1 if "norm" in name else weight_std
            param.copy_(torch.randn(param.shape, generator=gen) * std + mean)
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
        f.write(tokenizer_json)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN,
                   "bos_token": EOS_TOKEN, "model_max_length": max_position_embeddings,
                   "add_bos_token": False, "chat_template": CHAT_TEMPLATE}, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": eos_id, "eos_token_id": eos_id}, f, indent=2)
    return out_dir


def make_attn_metadata(query_lens: list[int], seq_lens: list[int],
                       block_tables: list[list[int]], block_size: int,
                       device: str | torch.device = "cpu") -> AttentionMetadata:
    """Metadata for seqs whose new tokens are the last query_lens[i] of seq_lens[i] positions."""
    slots = []
    for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
        for pos in range(s_len - q_len, s_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    width = max(len(t) for t in block_tables)
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), block_size=block_size)
