"""A bounded schema fuzz: schemathesis generates requests (valid and invalid) from the
server's own /openapi.json and sends them to a real server subprocess. Any 5xx, a hang
past the timeout, or a dead server fails the test; 4xx answers are what bad input gets.

Bounded: EXAMPLES per operation (a few hundred requests in all), a tiny model with a short
context, and a per-request timeout, so the run takes about a minute.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.e2e.test_server import start_server, stop_server
from tests.model_factory import make_tiny_model

pytestmark = pytest.mark.slow

EXAMPLES = 50  # per operation and mode; ~12 operations x 2 modes
TIMEOUT_S = 30  # a request that takes longer counts as a hang


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("model"), "LlamaForCausalLM")
    srv = start_server(path, str(tmp_path_factory.mktemp("log") / "server.log"),
                       "--max-model-len", "128", "--max-num-seqs", "8",
                       "--served-model-name", "tiny", defaults=False)
    yield srv
    stop_server(srv)


def _operations(server) -> list:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


# Driven by hypothesis directly (schemathesis' pytest plugin does not load under pytest 9).
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_or_hangs(fuzz_server, mode):
    operations = _operations(fuzz_server)
    assert len(operations) >= 10
    sent = 0
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            nonlocal sent
            response = case.call(base_url=fuzz_server.url, timeout=TIMEOUT_S)
            sent += 1
            assert response.status_code < 500, (
                f"{case.method} {case.path} -> {response.status_code}: "
                f"{response.text[:500]}\nbody: {str(case.body)[:500]}")

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid (GET /health has no inputs)
            assert mode is GenerationMode.NEGATIVE
        assert fuzz_server.proc.poll() is None, fuzz_server.log()[-3000:]
    print(f"\n{mode.value}: {sent} requests over {len(operations)} operations")


def test_server_alive_after_fuzzing(fuzz_server):
    r = httpx.post(fuzz_server.url + "/v1/completions",
                   json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert "Traceback" not in fuzz_server.log()
