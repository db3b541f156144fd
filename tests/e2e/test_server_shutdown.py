"""SIGTERM: the server stops accepting, lets the in-flight stream finish, and exits 0."""

from __future__ import annotations

import json
import signal

import httpx
import pytest

from tests.e2e.test_server import start_server, stop_server
from tests.model_factory import make_tiny_model

pytestmark = pytest.mark.slow


def test_sigterm_drains_in_flight_request_then_exits_0(tmp_path):
    path = make_tiny_model(tmp_path / "model", "LlamaForCausalLM")
    server = start_server(path, str(tmp_path / "server.log"), "--shutdown-timeout", "30")
    try:
        body = {"prompt": "hi", "max_tokens": 480, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", server.url + "/v1/completions", json=body,
                          timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        usage = json.loads(rest[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == 480
        assert server.proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=5)
        log = server.log()
        assert "Shutting down" in log and "engine stopped" in log
    finally:
        stop_server(server)
