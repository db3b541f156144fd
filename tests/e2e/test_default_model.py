"""The embedded default model and its draft: they load (tandem and transformers), the
tokenizer round-trips Python source exactly, and tandem's greedy completions equal
transformers' on the shipped weights."""

from __future__ import annotations

import inspect
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import tandem
from tandem import LLM, SamplingParams, default_draft_model_dir, default_model_dir
from tandem.engine.tokenizer import Tokenizer

PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef read_lines(path):",
           "class Stack:\n    def __init__(self):", "for i in range(10):\n   ",
           "<|fim_prefix|>def area(r):\n    return <|fim_suffix|> * r * r\n<|fim_middle|>"]


@pytest.mark.parametrize("path", [default_model_dir(), default_draft_model_dir()])
def test_shipped_files_and_sizes(path):
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    limit = 50e6 if path == default_model_dir() else 8e6
    assert size <= limit, size
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]


def test_tokenizer_round_trips_python_source_exactly():
    tok = Tokenizer(default_model_dir())
    sources = [inspect.getsource(m) for m in (json, os, inspect)]
    sources.append("s = 'caf\u00e9 \u2603 \U0001f600'\n\tx\t=\t1  \r\n  # trailing   \n")
    for src in sources:
        assert tok.decode(tok.encode(src), skip_special_tokens=False) == src
    for special in ("<|endoftext|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"):
        assert tok.token_to_id(special) is not None


@pytest.mark.parametrize("path", [default_model_dir(), default_draft_model_dir()])
def test_greedy_completions_equal_transformers(path):
    llm = LLM(path)
    tok = llm.get_tokenizer()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24),
                        use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = tok.encode(prompt)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                          pad_token_id=0)[0, len(ids):].tolist()
        got = out.outputs[0].token_ids
        # transformers stops at EOS and includes it; tandem does too.
        assert got == ref[:len(got)] and len(got) == len(ref), (prompt, got, ref)


def test_generate_cli_uses_default_model():
    assert LLM().engine.config.model.model == default_model_dir()
    assert tandem.default_model_dir() == default_model_dir()


def test_chat_template_frames_messages_as_python():
    tok = Tokenizer(default_model_dir())
    user = {"role": "user", "content": "Return the nth Fibonacci number."}
    # A user message becomes a docstring; the generation prompt is two blank lines after it.
    assert tok.apply_chat_template([user]) == '"""Return the nth Fibonacci number."""\n\n\n'
    assert tok.apply_chat_template([user], add_generation_prompt=False) == \
        '"""Return the nth Fibonacci number."""\n'
    conv = [{"role": "system", "content": "Small functions.\nNo imports."}, user,
            {"role": "assistant", "content": "def fib(n):\n    return n\n"},
            {"role": "user", "content": "Make it iterative."}]
    assert tok.apply_chat_template(conv) == (
        '# Small functions.\n# No imports.\n\n\n"""Return the nth Fibonacci number."""\n\n\n'
        'def fib(n):\n    return n\n\n\n"""Make it iterative."""\n\n\n')
    with pytest.raises(ValueError, match="tool"):
        tok.apply_chat_template([{"role": "tool", "content": "42"}])


def test_chat_with_the_default_model():
    llm = LLM()
    messages = [{"role": "user", "content": "Read a JSON config file and return it as a dict."}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False)[0]
    assert out.prompt == '"""Read a JSON config file and return it as a dict."""\n\n\n'
    assert out.outputs[0].text.strip()
