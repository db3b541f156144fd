"""Fill-in-the-middle through `suffix`, and chat on a model without a chat template: a
second server, on a tiny model whose tokenizer has FIM tokens and no template."""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.test_server import start_server, stop_server
from tests.model_factory import make_tiny_model

pytestmark = pytest.mark.slow

FIM = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("fim"), "LlamaForCausalLM",
                           extra_special_tokens=FIM)
    config = os.path.join(path, "tokenizer_config.json")
    with open(config) as f:
        tok_config = json.load(f)
    del tok_config["chat_template"]
    with open(config, "w") as f:
        json.dump(tok_config, f)
    srv = start_server(path, str(tmp_path_factory.mktemp("log") / "server.log"))
    yield srv
    stop_server(srv)


def test_suffix_builds_the_fim_prompt(server):
    client = server.client()
    for tok in FIM:  # each is one special token
        assert server.post("/tokenize", {"prompt": tok}).json()["count"] == 1
    prefix, suffix = "def add(a, b):\n", "\n    return c\n"
    ids = server.post("/tokenize", {"prompt": f"{FIM[0]}{prefix}{FIM[1]}{suffix}{FIM[2]}"}
                      ).json()["tokens"]
    kw = dict(model=client.models.list().data[0].id, max_tokens=10, temperature=0.0,
              extra_body={"ignore_eos": True})
    expected = client.completions.create(prompt=ids, **kw).choices[0].text
    out = client.completions.create(prompt=prefix, suffix=suffix, **kw)
    assert out.choices[0].text == expected and expected
    assert out.usage.prompt_tokens == len(ids)
    streamed = "".join(c.choices[0].text for c in
                       client.completions.create(prompt=prefix, suffix=suffix, stream=True, **kw)
                       if c.choices)
    assert streamed == expected


def test_chat_without_template_is_a_clear_400(server):
    for path in ("/v1/chat/completions", "/tokenize"):
        r = server.post(path, {"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400, r.text
        assert "chat template" in r.json()["error"]["message"]
        assert "--chat-template" in r.json()["error"]["message"]
    assert server.post("/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200
