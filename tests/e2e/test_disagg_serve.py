"""`tandem serve --prefill-workers P --decode-workers D --disagg-policy X`: real server
subprocesses (the front end and its engine processes), driven by the official `openai`
client, against a colocated engine's outputs.

    1P1D under every policy (and 1P2D): greedy outputs of a mixed workload with shared
    prefixes equal one engine's; /metrics counts the routes and the bytes moved
    the prefill worker frozen, then killed, under load: every request completes with the
    same outputs (fallback to decode-side prefill), later ones route locally, /health says
    "degraded"
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tandem import LLM, SamplingParams
from tests.e2e.test_server import start_server, stop_server
from tests.model_factory import make_tiny_model

pytestmark = pytest.mark.slow
SIZES = ["--block-size", "4", "--max-model-len", "256", "--num-kv-blocks", "256",
         "--max-num-seqs", "32"]
MAX_TOKENS = 10


def _workload() -> list[list[int]]:
    """Long prompts, some sharing a 48-token prefix, short ones, one on a block edge."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 500, (48,), generator=g).tolist()
    own = [torch.randint(3, 500, (n,), generator=g).tolist()
           for n in (40, 5, 60, 2, 70, 33, 12, 44)]
    return [shared + own[0], shared + own[1], own[2], own[3], shared + own[4], own[5],
            shared[:16] + own[6], own[7], shared + own[0][:3]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("disagg-serve"), "LlamaForCausalLM")


@pytest.fixture(scope="module")
def reference(tiny):
    llm = LLM(tiny, block_size=4, max_model_len=256, num_kv_blocks=256)
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(_workload(), sp, use_tqdm=False)]


def _complete_all(server, prompts: list[list[int]]) -> list[str]:
    """The prompts at once (threads), greedy; their texts in order."""
    client = server.client()

    def one(p: list[int]) -> str:
        r = client.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS,
                                      temperature=0.0, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length"
        return r.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def _later_requests_route_locally(server, prompts: list[list[int]], reference: list[str]
                                  ) -> None:
    """With no prefill worker left, every request prefills on its decode worker."""
    before = server.metric("tandem:disagg_requests_total", route="local")
    assert _complete_all(server, prompts) == reference
    assert server.metric("tandem:disagg_requests_total", route="local") == \
        before + len(prompts)


def _start(tiny, tmp_path, *args: str):
    return start_server(tiny, str(tmp_path / "server.log"), "--served-model-name", "tiny",
                        *SIZES, *args, defaults=False, timeout=180.0)


@pytest.mark.parametrize("policy,decode_workers,connector", [
    ("always", 1, "shm"), ("always", 1, "ipc"), ("always", 2, "nccl"), ("never", 1, "auto"),
    ("conditional", 1, "auto"), ("conditional", 2, "auto")])
def test_disaggregated_server_equals_colocated(tiny, reference, tmp_path, policy,
                                               decode_workers, connector):
    """(On a CPU, ipc carries the payload in the messages by value, nccl sends it point to
    point over gloo; on GPUs: tests/gpu/test_disagg_cuda.py.)"""
    server = _start(tiny, tmp_path, "--prefill-workers", "1", "--decode-workers",
                    str(decode_workers), "--disagg-policy", policy,
                    "--disagg-min-remote-tokens", "32", "--kv-connector", connector)
    try:
        prompts = _workload()
        # twice: the second round finds the first's blocks on the decode side(s)
        assert _complete_all(server, prompts) == reference
        assert _complete_all(server, prompts) == reference
        health = httpx.get(server.url + "/health", timeout=10).json()
        assert health["status"] == "ok"
        assert [w["role"] for w in health["workers"]] == ["decode"] * decode_workers + \
            ["prefill"]
        remote = server.metric("tandem:disagg_requests_total", route="remote")
        local = server.metric("tandem:disagg_requests_total", route="local")
        assert remote + local == 2 * len(prompts)
        assert server.metric("tandem:disagg_requests_total", route="fallback") == 0
        moved = server.metric("tandem:kv_transfer_bytes_total")
        if policy == "never":
            assert remote == 0 and moved == 0
        else:
            # always: everything with an uncached full block; conditional: the long,
            # uncached prompts (>= 32 tokens and >= 0.7 of the prompt)
            assert remote >= (6 if policy == "always" else 3)
            assert local >= (1 if policy == "always" else 4)
            assert moved > 0
            assert server.metric("tandem:kv_transfer_seconds_count") >= 1
            assert server.metric("tandem:kv_import_seconds_count") >= 1
        # the user-facing series add up over the decode workers
        assert server.metric("tandem:request_success_total", finished_reason="length") == \
            2 * len(prompts)
    finally:
        stop_server(server)


def test_prefill_worker_killed_under_load_every_request_completes(tiny, reference, tmp_path):
    server = _start(tiny, tmp_path, "--prefill-workers", "1", "--disagg-policy", "always",
                    "--kv-transfer-timeout", "600")
    try:
        prompts = _workload()
        assert _complete_all(server, prompts) == reference  # warm: the path works
        prefill = next(w for w in httpx.get(server.url + "/health").json()["workers"]
                       if w["role"] == "prefill")
        os.kill(prefill["pid"], signal.SIGSTOP)  # frozen: remote requests wait on it
        fresh = [[t + 1 for t in p] for p in prompts]  # nothing cached anywhere
        base = server.metric("tandem:disagg_requests_total", route="remote")
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_complete_all, server, fresh)
            deadline = time.monotonic() + 60
            while server.metric("tandem:disagg_requests_total", route="remote") < base + 6 \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not pending.done()  # they wait for KV that cannot come
            os.kill(prefill["pid"], signal.SIGKILL)
            got = pending.result(timeout=120)
        llm = LLM(tiny, block_size=4, max_model_len=256, num_kv_blocks=256)
        sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        assert got == [o.outputs[0].text for o in llm.generate(fresh, sp, use_tqdm=False)]
        assert server.metric("tandem:disagg_requests_total", route="fallback") >= 6
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert [w["alive"] for w in health.json()["workers"]] == [True, False]
        assert server.metric("tandem:worker_up", role="prefill", worker="0") == 0
        _later_requests_route_locally(server, prompts, reference)
    finally:
        stop_server(server)


def test_bad_layouts_are_refused(tiny, tmp_path):
    import subprocess
    import sys
    cases = ((["--prefill-workers", "1", "--no-engine-process"], "engine process"),
             (["--decode-workers", "0"], "decode_workers"),
             (["--prefill-workers", "1", "--disagg-min-uncached-fraction", "2"],
              "min_uncached_fraction"),
             (["--remote-prefill", "127.0.0.1:1"], "cannot reach the worker"),
             (["--remote-prefill", "nowhere"], "HOST:PORT"),
             (["--remote-prefill", "127.0.0.1:9", "--kv-connector", "shm"], "point-to-point"))
    for batch in (cases[:3], cases[3:]):  # three at a time: each is mostly start-up
        procs = [subprocess.Popen([sys.executable, "-m", "tandem", "serve", tiny, *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "TANDEM_WORKER_KEY": "k",
                                       "OMP_NUM_THREADS": "1"})
                 for args, _ in batch]
        for proc, (args, words) in zip(procs, batch):
            _, err = proc.communicate(timeout=180)
            assert proc.returncode != 0 and words in err, (args, err[-2000:])


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_workers_started_apart_and_joined_by_address(tiny, reference, tmp_path):
    """`tandem worker --listen` twice (a prefill and a decode worker, as on other machines)
    and a front end with one local decode worker that joins them by address: outputs equal
    one engine's, KV moves point to point (gloo here), /health lists the addresses; when
    the remote prefill worker dies, requests route locally and /health says degraded."""
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TANDEM_WORKER_KEY": "test-key"}
    ports = [_free_port(), _free_port()]
    workers = [subprocess.Popen([sys.executable, "-m", "tandem", "worker", tiny, "--listen",
                                 f"127.0.0.1:{port}", *SIZES], env=env,
                                stdout=open(tmp_path / f"worker{i}.log", "w"),
                                stderr=subprocess.STDOUT) for i, port in enumerate(ports)]
    try:
        time.sleep(3)  # listening (the model loads once the front end connects)
        server = start_server(tiny, str(tmp_path / "server.log"), "--served-model-name",
                              "tiny", *SIZES, "--remote-prefill", f"127.0.0.1:{ports[0]}",
                              "--remote-decode", f"127.0.0.1:{ports[1]}",
                              "--disagg-policy", "always", defaults=False, timeout=180.0,
                              env={"TANDEM_WORKER_KEY": "test-key"})
        try:
            prompts = _workload()
            assert _complete_all(server, prompts) == reference
            health = httpx.get(server.url + "/health", timeout=10).json()
            assert health["status"] == "ok"
            assert [(w["role"], w["address"]) for w in health["workers"]] == [
                ("decode", None), ("decode", f"127.0.0.1:{ports[1]}"),
                ("prefill", f"127.0.0.1:{ports[0]}")]
            assert server.metric("tandem:disagg_requests_total", route="remote") >= 6
            assert server.metric("tandem:kv_transfer_bytes_total") > 0
            assert server.metric("tandem:disagg_requests_total", route="fallback") == 0
            workers[0].kill()  # the prefill worker's machine goes away
            workers[0].wait(timeout=30)
            deadline = time.monotonic() + 30
            while httpx.get(server.url + "/health").json()["status"] != "degraded":
                assert time.monotonic() < deadline
                time.sleep(0.2)
            _later_requests_route_locally(server, prompts, reference)
        finally:
            stop_server(server)
        assert workers[1].wait(timeout=60) == 0  # the front end left: the worker exits
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()


def test_a_worker_refuses_a_front_end_without_the_key(tiny, tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "tandem", "worker", tiny, "--listen",
                        "127.0.0.1:1"], capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "TANDEM_WORKER_KEY"})
    assert r.returncode == 2 and "TANDEM_WORKER_KEY" in r.stderr


def test_clients_that_leave_early_leave_nothing_behind(tiny, tmp_path):
    """Streams of remote requests closed after their first chunk, 12 at 4 at a time: both
    workers end idle with no KV held, no payload file is left in shared memory, and the
    server still answers."""
    import glob
    before = set(glob.glob("/dev/shm/tkv*"))
    server = _start(tiny, tmp_path, "--prefill-workers", "1", "--disagg-policy", "always",
                    "--kv-connector", "shm")
    try:
        prompts = [[t + k for t in p] for k, p in enumerate(_workload()[:4])]

        def leave_early(p: list[int]) -> None:
            with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
                    "prompt": p, "max_tokens": 100, "stream": True, "ignore_eos": True,
                    "model": "tiny"}) as r:
                assert r.status_code == 200
                for _ in r.iter_lines():
                    break  # go away after the first chunk

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(leave_early, prompts * 3))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            idle = all(server.metric(f"tandem:worker_num_requests_{s}", role=r,
                                     worker="0") == 0
                       for s in ("running", "waiting") for r in ("decode", "prefill"))
            if idle and server.metric("tandem:kv_cache_usage_perc") == 0:
                break
            time.sleep(0.2)
        assert idle and server.metric("tandem:kv_cache_usage_perc") == 0
        assert set(glob.glob("/dev/shm/tkv*")) <= before  # every payload received or dropped
        assert _complete_all(server, _workload()[:2]) is not None
    finally:
        stop_server(server)
