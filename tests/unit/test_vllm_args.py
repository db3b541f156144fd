"""vLLM's spellings of engine arguments that launch scripts carry over: dtype aliases,
human-readable lengths, max_logprobs -1, a separate tokenizer directory, and
trust_remote_code (accepted, with a warning that it changes nothing)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil

import pytest

from tandem import LLM, SamplingParams
from tandem.cli import build_parser, human_int
from tandem.config import ModelConfig
from tests.model_factory import make_tiny_model


def test_human_readable_ints() -> None:
    assert [human_int(s) for s in ("4096", "1k", "32k", "1K", "2M", "1.5k")] == \
        [4096, 1000, 32000, 1024, 2 * 2**20, 1500]
    for bad in ("abc", "k", "1x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            human_int(bad)


def test_serve_flags_parse_vllm_spellings() -> None:
    args = build_parser().parse_args(["serve", "--max-model-len", "2K", "--dtype", "half",
                                      "--trust-remote-code", "--max-logprobs", "-1"])
    assert (args.max_model_len, args.dtype, args.trust_remote_code, args.max_logprobs) == \
        (2048, "half", True, -1)


def test_serve_takes_several_model_names_and_disable_log_stats() -> None:
    from tandem.server.cli import server_config
    from tandem.server.config import ServerConfig
    config = server_config(build_parser().parse_args(
        ["serve", "m", "--served-model-name", "gpt-x-0613", "gpt-x", "--disable-log-stats"]))
    assert config.served_model_name == ("gpt-x-0613", "gpt-x") and config.disable_log_stats
    assert server_config(build_parser().parse_args(["serve", "m"])).served_model_name is None
    assert ServerConfig(served_model_name="one").served_model_name == ("one",)
    with pytest.raises(ValueError, match="served_model_name"):
        ServerConfig(served_model_name=("a", " "))


def test_model_config_dtype_aliases_and_limits(tmp_path) -> None:
    path = make_tiny_model(tmp_path)
    assert ModelConfig(path, dtype="half").dtype == "float16"
    assert ModelConfig(path, dtype="float").dtype == "float32"
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(path, dtype="double")
    with pytest.raises(ValueError, match="max_logprobs"):
        ModelConfig(path, max_logprobs=-2)
    with pytest.raises(ValueError, match="tokenizer"):
        ModelConfig(path, tokenizer=str(tmp_path / "nowhere"))


def test_max_logprobs_minus_one_means_the_vocabulary(tmp_path) -> None:
    path = make_tiny_model(tmp_path)  # vocab 512
    capped = LLM(path)
    with pytest.raises(ValueError, match="logprobs"):
        capped.generate("def f", SamplingParams(max_tokens=1, logprobs=50), use_tqdm=False)
    llm = LLM(path, max_logprobs=-1)
    out = llm.generate("def f", SamplingParams(max_tokens=1, logprobs=50),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs[0]) >= 50
    with pytest.raises(ValueError, match="logprobs"):
        llm.generate("def f", SamplingParams(max_tokens=1, logprobs=513), use_tqdm=False)


def test_tokenizer_from_another_directory(tmp_path, caplog) -> None:
    """Weights without a tokenizer run on token ids only; tokenizer=DIR gives them text."""
    path = make_tiny_model(tmp_path / "full")
    bare = tmp_path / "bare"
    os.makedirs(bare)
    for name in os.listdir(path):
        if not name.startswith("tokenizer"):
            shutil.copy(os.path.join(path, name), bare)
    with pytest.raises(ValueError):
        LLM(str(bare)).generate("def f", SamplingParams(max_tokens=2), use_tqdm=False)
    with caplog.at_level(logging.WARNING):
        llm = LLM(str(bare), tokenizer=path, trust_remote_code=True)
    assert any("trust_remote_code has no effect" in r.getMessage() for r in caplog.records)
    got = llm.generate("def f", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                       use_tqdm=False)[0]
    want = LLM(path).generate("def f", SamplingParams(max_tokens=4, temperature=0.0,
                                                      ignore_eos=True), use_tqdm=False)[0]
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert got.outputs[0].text == want.outputs[0].text


def test_offline_extras(tmp_path) -> None:
    """truncate_prompt_tokens keeps the prompt's last tokens; get_default_sampling_params;
    chat_template_kwargs reach the template; continue_final_message is refused."""
    path = make_tiny_model(tmp_path)
    llm = LLM(path)
    greedy = dict(temperature=0.0, max_tokens=3, ignore_eos=True)
    prompt = list(range(5, 25))
    cut = llm.generate([prompt], SamplingParams(**greedy, truncate_prompt_tokens=6),
                       use_tqdm=False)[0]
    tail = llm.generate([prompt[-6:]], SamplingParams(**greedy), use_tqdm=False)[0]
    assert cut.prompt_token_ids == prompt[-6:]
    assert cut.outputs[0].token_ids == tail.outputs[0].token_ids
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)
    assert isinstance(llm.get_default_sampling_params(), SamplingParams)
    conv = [{"role": "user", "content": "hi"}]
    template = "{{ greeting }} {{ messages[0]['content'] }}"
    out = llm.chat(conv, SamplingParams(**greedy), use_tqdm=False, chat_template=template,
                   chat_template_kwargs={"greeting": "hello"})[0]
    assert out.prompt == "hello hi"
    with pytest.raises(ValueError, match="may not set"):
        llm.chat(conv, chat_template=template, chat_template_kwargs={"messages": []})
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(conv, continue_final_message=True)
