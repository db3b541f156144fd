"""The command line as a vLLM user meets it: `tandem serve MODEL`, `--version`, help text
for every flag (from the config dataclasses' comments), one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from tandem.cli import build_parser
from tandem.config import CacheConfig, ModelConfig, SchedulerConfig, field_comments
from tandem.server.cli import server_config
from tandem.server.config import ServerConfig


@pytest.mark.parametrize("cls", [ModelConfig, CacheConfig, SchedulerConfig, ServerConfig])
def test_every_config_field_has_help(cls):
    comments = field_comments(cls)
    assert {f.name for f in dataclasses.fields(cls)} <= set(comments)
    assert all(len(text) > 8 for text in comments.values()), comments


def test_serve_help_shows_every_flag_with_text_and_default():
    help_text = " ".join(build_parser()._subparsers._group_actions[0]
                         .choices["serve"].format_help().split())
    for flag, fragment in [("--max-num-seqs", "most requests running at once (default: 256)"),
                           ("--max-request-body-bytes", "(default: 16777216)"),
                           ("--max-logprobs", "(default: 20)"),
                           ("--generation-config", "generation_config.json"),
                           ("--uvicorn-log-level", "uvicorn's log level"),
                           ("--enable-log-requests", "log each request"),
                           ("--disable-log-requests", "do not log"),
                           ("--allowed-origins", "CORS")]:
        assert flag in help_text and fragment in help_text, flag


def test_serve_takes_the_model_positionally_and_server_flags_typed():
    args = build_parser().parse_args(["serve", "/models/x", "--max-waiting-requests", "7",
                                      "--port", "9000", "--enable-log-requests"])
    assert args.model_tag == "/models/x"
    config = server_config(args)
    assert (config.max_waiting_requests, config.port, config.enable_log_requests) == \
        (7, 9000, True)
    assert server_config(build_parser().parse_args(
        ["serve", "--disable-log-requests"])).enable_log_requests is False
    with pytest.raises(ValueError, match="port"):
        ServerConfig(port=0)
    with pytest.raises(ValueError, match="uvicorn_log_level"):
        ServerConfig(uvicorn_log_level="loud")
    with pytest.raises(ValueError, match="metrics_prefix"):
        ServerConfig(metrics_prefix="vllm:x")
    assert server_config(build_parser().parse_args(
        ["serve", "--metrics-prefix", "vllm"])).metrics_prefix == "vllm"


def _tandem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem", *args], capture_output=True,
                          text=True, timeout=120)


def test_version():
    out = _tandem("--version")
    assert out.returncode == 0 and out.stdout.startswith("tandem ")


@pytest.mark.parametrize("args,fragment", [
    (["serve", "meta-llama/Llama-3.1-8B"], "'meta-llama/Llama-3.1-8B' does not exist"),
    (["serve", "/tmp", "--port", "8123"], "'/tmp' has no config.json"),
    (["serve", "a", "--model", "b"], "two models given"),
    (["generate", "hi", "--model", "/nope"], "'/nope' does not exist"),
    (["generate", "def f", "--max-tokens", "5000"], "maximum context length is 2048"),
])
def test_bad_input_is_one_line_not_a_traceback(args, fragment):
    out = _tandem(*args)
    assert out.returncode == 2
    assert fragment in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
