"""The OpenAI-compatible server, end to end: a real `python -m tandem serve` subprocess on a
loopback port, driven by the official `openai` client and raw HTTP (httpx).

One server for this module (a tiny random Llama with a ChatML template, behind an API key);
test_server_fim.py and test_server_shutdown.py start their own (FIM tokens without a chat
template; SIGTERM). The helpers here start and stop them.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.model_factory import make_tiny_model

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_KEY = "test-key"
MAX_MODEL_LEN = 512


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log_path: str
    api_key: str | None

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none",
                             max_retries=0, timeout=60)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def post(self, path: str, body: dict, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.headers(), timeout=60, **kw)

    def metric(self, name: str, **labels: str) -> float:
        """A series' value from /metrics; every series carries model_name (vLLM's way)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        for line in text.splitlines():
            series, _, value = line.rpartition(" ")
            if series.split("{")[0] == name and all(f'{k}="{v}"' in series
                                                    for k, v in labels.items()):
                assert 'model_name="' in series, line
                return float(value)
        raise KeyError(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: str, log_path: str, *args: str, api_key: str | None = None,
                 timeout: float = 120.0, env: dict[str, str] | None = None,
                 defaults: bool = True) -> Server:
    """Start `tandem serve MODEL` on a free loopback port and wait for /health. `defaults`
    adds this module's engine sizes (a short context, a small KV pool)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "tandem", "serve", model_dir, "--host", "127.0.0.1",
           "--port", str(port)]
    if defaults:
        cmd += ["--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "512",
                "--max-num-seqs", "128"]
    cmd += list(args)
    if api_key:
        cmd += ["--api-key", api_key]
    # One intra-op thread: the tiny model gains nothing from more, and on a small CI box
    # they would fight the test client for the cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env.pop("TANDEM_API_KEY", None)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    log.close()
    server = Server(proc, f"http://127.0.0.1:{port}", log_path, api_key)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"server did not come up in {timeout}s:\n{server.log()[-3000:]}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("model"), "LlamaForCausalLM")
    srv = start_server(path, str(tmp_path_factory.mktemp("log") / "server.log"),
                       "--served-model-name", "tiny", api_key=API_KEY)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


PROMPT = "The quick brown fox jumps over the lazy dog."
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def test_health_models_metrics_open_without_key(server, client):
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert "tandem:kv_cache_usage_perc" in httpx.get(server.url + "/metrics", timeout=10).text
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "test-key"}])
def test_missing_or_wrong_key_is_401(server, headers):
    for path, body in [("/v1/completions", {"prompt": "hi"}), ("/tokenize", {"prompt": "hi"})]:
        r = httpx.post(server.url + path, json=body, headers=headers, timeout=10)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", headers=headers, timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong",
                      max_retries=0).models.list()


def test_completion_usage_matches_tokenize(server, client):
    count = server.post("/tokenize", {"prompt": PROMPT}).json()["count"]
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, **GREEDY)
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == count and out.usage.completion_tokens == 7
    assert out.usage.total_tokens == count + 7
    ids = server.post("/tokenize", {"prompt": PROMPT + out.choices[0].text}).json()["tokens"]
    assert len(ids) >= count  # the text decodes to something tokenizable
    strs = server.post("/tokenize", {"prompt": PROMPT, "return_token_strs": True}).json()
    assert len(strs["token_strs"]) == count and all(isinstance(t, str) for t in strs["token_strs"])
    assert "token_strs" not in server.post("/tokenize", {"prompt": PROMPT}).json()


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_equals_non_stream_greedy(client, endpoint):
    if endpoint == "completions":
        kw = dict(model="tiny", prompt=PROMPT, max_tokens=24, **GREEDY)
        full = client.completions.create(**kw).choices[0].text
        chunks = list(client.completions.create(stream=True, **kw))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    else:
        kw = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                  max_tokens=24, **GREEDY)
        full = client.chat.completions.create(**kw).choices[0].message.content
        chunks = list(client.chat.completions.create(stream=True, **kw))
        assert chunks[0].choices[0].delta.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full and full
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_and_several_prompts_in_openai_order(server, client):
    prompts = [PROMPT, "def fibonacci(n):"]
    single = [client.completions.create(model="tiny", prompt=p, max_tokens=6,
                                        **GREEDY).choices[0].text for p in prompts]
    out = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [single[0], single[0], single[1], single[1]]
    assert out.usage.completion_tokens == 24
    ids = [server.post("/tokenize", {"prompt": p}).json()["tokens"] for p in prompts]
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, **GREEDY)
    assert [c.text for c in by_ids.choices] == single
    sampled = client.completions.create(model="tiny", prompt=PROMPT, n=3, max_tokens=12,
                                        temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert len({c.text for c in sampled.choices}) > 1  # distinct seeds per sample
    chat = client.chat.completions.create(model="tiny", n=2, max_tokens=4, **GREEDY,
                                          messages=[{"role": "user", "content": "hi"}])
    assert [c.index for c in chat.choices] == [0, 1]
    # more sequences than --max-num-seqs (128) run in waves, as in vLLM
    many = client.completions.create(model="tiny", prompt=[PROMPT] * 130, max_tokens=2,
                                     **GREEDY)
    assert [c.index for c in many.choices] == list(range(130))
    assert len({c.text for c in many.choices}) == 1


def test_stop_string(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40,
                                     **GREEDY).choices[0].text
    stop = next(full[i:i + 3] for i in range(2, len(full) - 3)
                if full[i:i + 3].isascii() and full[i:i + 3].strip())
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40, stop=[stop],
                                    **GREEDY)
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == stop  # vLLM's field
    streamed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=40,
                                         stop=[stop], stream=True, **GREEDY)
    last = [c.choices[0] for c in streamed if c.choices][-1]
    assert last.finish_reason == "stop" and last.model_extra["stop_reason"] == stop
    chat = client.chat.completions.create(model="tiny", max_tokens=40, stop=[stop], **GREEDY,
                                          messages=[{"role": "user", "content": "hi"}])
    c = chat.choices[0]
    assert c.model_extra["stop_reason"] == (stop if c.finish_reason == "stop" else None)


def test_logprobs_and_echo(server, client):
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, logprobs=2,
                                    **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and chosen == pytest.approx(max(top.values()))  # greedy = argmax
        assert tok in top and 2 <= len(top) <= 3
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    count = server.post("/tokenize", {"prompt": PROMPT}).json()["count"]
    echo = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, echo=True,
                                     logprobs=1, **GREEDY)
    c = echo.choices[0]
    assert c.text.startswith(PROMPT) and len(c.text) > len(PROMPT)
    assert len(c.logprobs.tokens) == count + 3
    assert c.logprobs.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in c.logprobs.token_logprobs[1:])


def test_chat_logprobs_and_usage(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    count = server.post("/tokenize", {"messages": messages}).json()["count"]
    out = client.chat.completions.create(model="tiny", messages=messages, logprobs=True,
                                         top_logprobs=2, max_completion_tokens=5, **GREEDY)
    assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == count and out.usage.completion_tokens == 5
    content = out.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_chat_tools_only_with_tool_choice_none(server, client):
    """Tools go to the chat template with tool_choice "none" (vLLM renders them; this
    model's template ignores them); asking for tool calls is a 400 that says so."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    messages = [{"role": "user", "content": "Hi"}]
    out = client.chat.completions.create(model="tiny", messages=messages, tools=tools,
                                         tool_choice="none", max_tokens=3, **GREEDY)
    assert out.usage.completion_tokens == 3 and not out.choices[0].message.tool_calls
    for choice in ("auto", None, "required", {"type": "function", "function": {"name": "f"}}):
        body = {"messages": messages, "tools": tools, "max_tokens": 2}
        if choice is not None:
            body["tool_choice"] = choice
        r = server.post("/v1/chat/completions", body)
        assert r.status_code == 400 and "tool_choice" in r.text, (choice, r.text)
    r = server.post("/v1/chat/completions", {"messages": messages, "tool_choice": "required",
                                             "max_tokens": 2})
    assert r.status_code == 400


def test_repeated_long_prompt_reports_cached_tokens(client):
    prompt = " ".join(f"item{i}" for i in range(90))
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, **GREEDY)
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, **GREEDY)
    n = first.usage.prompt_tokens
    assert n > 64
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < n


def test_chat_echo_prepends_the_last_assistant_message(client):
    """vLLM's chat echo: with the conversation ending in an assistant message (continued,
    add_generation_prompt false), every choice's text starts with that message."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once "}]
    kw = dict(model="tiny", messages=messages, max_tokens=4, temperature=0.0)
    body = {**GREEDY["extra_body"], "add_generation_prompt": False}
    plain = client.chat.completions.create(**kw, extra_body=body).choices[0].message.content
    echoed = client.chat.completions.create(**kw, extra_body={**body, "echo": True})
    assert echoed.choices[0].message.content == "Once " + plain
    chunks = client.chat.completions.create(**kw, stream=True,
                                            extra_body={**body, "echo": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Once " + plain
    user_last = client.chat.completions.create(
        model="tiny", messages=messages[:1], max_tokens=4, temperature=0.0,
        extra_body={**GREEDY["extra_body"], "echo": True})
    assert not user_last.choices[0].message.content.startswith("Hi")


def test_return_token_ids(server):
    """vLLM's return_token_ids: each choice's generated ids and its prompt's (not with
    stream: a 400 that says so)."""
    body = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
    r = server.post("/v1/completions", {"prompt": PROMPT, **body}).json()
    c = r["choices"][0]
    assert c["prompt_token_ids"] == server.post("/tokenize", {"prompt": PROMPT}).json()["tokens"]
    assert len(c["token_ids"]) == 4 and c["text"] == server.post(
        "/detokenize", {"tokens": c["token_ids"]}).json()["prompt"]
    messages = [{"role": "user", "content": "Hi"}]
    r = server.post("/v1/chat/completions", {"messages": messages, **body}).json()
    assert r["prompt_token_ids"] == server.post("/tokenize",
                                                {"messages": messages}).json()["tokens"]
    assert len(r["choices"][0]["token_ids"]) == 4
    plain = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2}).json()
    assert plain["choices"][0]["token_ids"] is None
    # streamed: each chunk's new ids (held-back text's ids ride on a later chunk), the
    # prompt's with a choice's first chunk
    for path, extra in [("/v1/completions", {"prompt": PROMPT, "n": 2}),
                        ("/v1/chat/completions", {"messages": messages, "n": 2})]:
        full = server.post(path, {**extra, **body}).json()
        with httpx.stream("POST", server.url + path, json={**extra, **body, "stream": True},
                          headers=server.headers(), timeout=60) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: {")]
        for choice in full["choices"]:
            i = choice["index"]
            got = [t for e in events for ch in e["choices"] if ch["index"] == i
                   for t in ch["token_ids"]]
            assert got == choice["token_ids"]
            prompts = [e.get("prompt_token_ids") or ch.get("prompt_token_ids")
                       for e in events for ch in e["choices"]
                       if ch["index"] == i and (e.get("prompt_token_ids")
                                                or ch.get("prompt_token_ids"))]
            want = full.get("prompt_token_ids") or choice.get("prompt_token_ids")
            assert prompts[:1] == [want]


def test_continuous_usage_stats(server, client):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries its choice's usage
    so far; the closing usage chunk has the totals."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    for create, kw in [(client.completions.create, {"prompt": PROMPT}),
                       (client.chat.completions.create,
                        {"messages": [{"role": "user", "content": "Hi"}]})]:
        chunks = list(create(model="tiny", max_tokens=5, n=2, stream=True,
                             stream_options=opts, **kw, **GREEDY))
        final = chunks[-1].usage
        assert not chunks[-1].choices and final.completion_tokens == 10
        seen = {0: [], 1: []}
        for ch in chunks[:-1]:
            assert ch.usage is not None and ch.usage.prompt_tokens == final.prompt_tokens
            assert ch.usage.total_tokens == ch.usage.prompt_tokens + ch.usage.completion_tokens
            seen[ch.choices[0].index].append(ch.usage.completion_tokens)
        for counts in seen.values():  # per choice, growing to its 5 tokens
            assert counts == sorted(counts) and counts[-1] == 5
        plain = list(create(model="tiny", max_tokens=2, stream=True,
                            stream_options={"include_usage": True}, **kw, **GREEDY))
        assert all(ch.usage is None for ch in plain[:-1]) and plain[-1].usage is not None


def test_bad_words(server, client):
    """A token forced by logit_bias +100 is still never generated once its word is bad."""
    def text_of(t):
        return server.post("/detokenize", {"tokens": [t]}).json()["prompt"]

    def tokens_of(text):
        return server.post("/tokenize", {"prompt": text, "add_special_tokens": False}
                           ).json()["tokens"]

    tok = next(t for t in range(5, 200) if text_of(t).strip()
               and tokens_of(text_of(t).lstrip()) == [t])
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=3, logit_bias={str(tok): 100}, **GREEDY)
    forced = client.completions.create(**kw).choices[0].text
    assert forced == text_of(tok) * 3
    body = {**GREEDY["extra_body"], "bad_words": [text_of(tok)]}
    banned = client.completions.create(**{**kw, "extra_body": body}).choices[0].text
    assert text_of(tok).strip() not in banned
    r = server.post("/v1/completions", {"prompt": PROMPT, "bad_words": [""]})
    assert r.status_code == 400 and "bad_words" in r.text


def test_logit_bias(server, client):
    forced = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3,
                                       logit_bias={"5": 100}, **GREEDY)
    assert forced.choices[0].text == server.post("/detokenize",
                                                 {"tokens": [5, 5, 5]}).json()["prompt"]
    ids = {"extra_body": {**GREEDY["extra_body"], "return_tokens_as_token_ids": True},
           **{k: v for k, v in GREEDY.items() if k != "extra_body"}}
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, logprobs=1,
                                      **ids)
    first = int(plain.choices[0].logprobs.tokens[0].split(":")[1])
    banned = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, logprobs=1,
                                       logit_bias={str(first): -100}, **ids)
    assert banned.choices[0].logprobs.tokens[0] != plain.choices[0].logprobs.tokens[0]
    only = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, logprobs=0,
                                     extra_body={**ids["extra_body"],
                                                 "allowed_token_ids": [7, 9]},
                                     **{k: v for k, v in ids.items() if k != "extra_body"})
    assert set(only.choices[0].logprobs.tokens) <= {"token_id:7", "token_id:9"}
    chat = client.chat.completions.create(model="tiny", max_tokens=2, logit_bias={"5": 100},
                                          messages=[{"role": "user", "content": "hi"}], **GREEDY)
    assert chat.choices[0].message.content == server.post(
        "/detokenize", {"tokens": [5, 5]}).json()["prompt"]


def test_tokenize_detokenize_roundtrip(server):
    r = server.post("/tokenize", {"prompt": PROMPT}).json()
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_MODEL_LEN
    assert server.post("/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": PROMPT}
    assert server.post("/detokenize", {"tokens": [1, 10**6]}).status_code == 400


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "top_p": 7}, "top_p"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "hi", "logprobs": 50}, "logprobs"),
    ({"prompt": "hi", "presence_penalty": 9}, "presence_penalty"),
    ({"prompt": "hi", "stop": 5}, "stop"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2, 99999]}, "prompt_token_ids"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "hi", "suffix": "x"}, "suffix"),  # this tokenizer has no FIM tokens
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"prompt": "hi", "allowed_token_ids": [99999]}, "allowed_token_ids"),
    ({"prompt": "hi", "allowed_token_ids": []}, "allowed_token_ids"),
])
def test_bad_completion_params_are_400(server, body, param):
    assert _error(server.post("/v1/completions", body), 400)["param"] == param


def test_too_long_prompt_is_400_with_lengths(server):
    err = _error(server.post("/v1/completions", {"prompt": [5] * 600}), 400)
    assert "512" in err["message"] and "600" in err["message"]
    err = _error(server.post("/v1/completions", {"prompt": [5] * 500, "max_tokens": 20}), 400)
    assert all(s in err["message"] for s in ("512", "520", "500", "20"))
    assert err["code"] == "context_length_exceeded"
    err = _error(server.post("/v1/chat/completions", {"messages": [
        {"role": "user", "content": "word " * 600}]}), 400)
    assert "512" in err["message"]


def test_malformed_requests_are_400_and_unknown_model_404(server):
    bad_json = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "hi",',
                          headers={**server.headers(), "Content-Type": "application/json"})
    assert "JSON" in _error(bad_json, 400)["message"]
    _error(server.post("/v1/chat/completions", {"messages": "hello"}), 400)
    _error(server.post("/v1/chat/completions", {"messages": []}), 400)
    _error(server.post("/v1/chat/completions", {"messages": [{"content": "no role"}]}), 400)
    _error(httpx.post(server.url + "/v1/completions", content=b"[1, 2]",
                      headers=server.headers()), 400)
    err = _error(server.post("/v1/completions", {"model": "gpt-9", "prompt": "hi"}), 404)
    assert err["code"] == "model_not_found"
    _error(httpx.get(server.url + "/v1/nothing-here", headers=server.headers()), 404)


def test_openai_client_sees_typed_errors_and_server_survives(server, client):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny", prompt="hi", top_p=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    assert server.proc.poll() is None
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


def _wait_idle(server: Server, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (server.metric("tandem:num_requests_running") == 0
                and server.metric("tandem:kv_cache_usage_perc") == 0):
            return
        time.sleep(0.05)
    raise AssertionError("the request still holds KV blocks")


def test_disconnect_mid_stream_frees_blocks(server):
    before = server.metric("tandem:generation_tokens_total")
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 480, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers=server.headers(), timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert got and json.loads(got[0][6:])["choices"]
        assert server.metric("tandem:kv_cache_usage_perc") > 0
    _wait_idle(server)  # the client closed the connection: aborted, blocks freed
    assert server.metric("tandem:generation_tokens_total") - before < 480


def test_disconnect_while_waiting_for_a_non_streamed_completion(server):
    before = server.metric("tandem:generation_tokens_total")
    # 8 x 460 tokens (a second or more of the tiny model on a quiet box, whose single
    # sequence can finish 400 tokens in under 0.3 s) and a client that gives up after
    # 0.2 s: finishing them all means the disconnect was missed.
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 8,
            "max_tokens": 460, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=server.headers(),
                   timeout=httpx.Timeout(10, read=0.2))
    _wait_idle(server)
    assert server.metric("tandem:generation_tokens_total") - before < 8 * 460


def test_64_concurrent_streaming_clients(server):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int, str | None]:
        common = dict(model="tiny", max_tokens=16, stream=True, temperature=0.8, seed=i,
                      stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        if i % 2:
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": f"Question {i}?"}], **common)
        else:
            stream = await client.completions.create(prompt=f"Request {i}: {PROMPT}", **common)
        text, tokens, finish = "", -1, None
        async for chunk in stream:
            for c in chunk.choices:
                text += (c.delta.content or "") if i % 2 else c.text
                finish = c.finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, tokens, finish

    async def main() -> list:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY,
                                    max_retries=0, timeout=120)
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(one(client, i) for i in range(64))), timeout=120)
        finally:
            await client.close()

    results = asyncio.run(main())
    assert [(tokens, finish) for _, tokens, finish in results] == [(16, "length")] * 64
    assert all(text for text, _, _ in results)
    assert server.metric("tandem:num_requests_running") == 0
    assert server.metric("tandem:kv_cache_usage_perc") == 0
