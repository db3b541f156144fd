"""`tandem bench serve` against a real server: every arrival mode and dataset kind, the
JSON contract, and the client's own speed against a stub server."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys

import pytest

from tandem import default_model_dir
from tandem.bench import datasets
from tandem.bench.serve import run_load
from tandem.bench.serve_cli import add_serve_bench_args, measure
from tandem.engine.tokenizer import Tokenizer
from tests.e2e.test_server import start_server, stop_server

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(default_model_dir(), str(tmp_path_factory.mktemp("log") / "server.log"),
                       "--max-num-seqs", "16", "--max-model-len", "1024", defaults=False)
    yield srv
    stop_server(srv)


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_bench_args(p)
    return p.parse_args(["--no-progress", "--num-prompts", "12", "--random-input-len", "32",
                         "--random-output-len", "8", *argv])


@pytest.mark.parametrize("argv", [
    ["--max-concurrency", "4"],  # request rate inf, paced by concurrency
    ["--request-rate", "40"],  # Poisson
    ["--request-rate", "40", "--constant-rate"],
    ["--request-rate", "40", "--burstiness", "0.3"],  # bursty gamma
], ids=["concurrency", "poisson", "constant", "bursty"])
def test_arrival_modes(server, argv):
    summary, records = measure(_args("--ignore-eos", *argv), server.url)
    assert (summary["completed"], summary["failed"]) == (12, 0)
    assert all(r.output_tokens == 8 and r.prompt_tokens == 32 for r in records)
    assert summary["ttft_s"]["median"] > 0 and summary["tpot_s"]["median"] > 0
    if "--request-rate" in argv:  # spread out: the last request left after a while
        assert max(r.start_s for r in records) > 0.05


def test_datasets(server, tmp_path):
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": f"Write a function number {i}."},
        {"from": "gpt", "value": "def f():\n    return 1\n"}]} for i in range(5)]))
    jsonl = tmp_path / "bodies.jsonl"
    jsonl.write_text("\n".join(json.dumps(b) for b in [
        {"prompt": "import os\n", "max_tokens": 5},
        {"messages": [{"role": "user", "content": "sort a list"}], "max_tokens": 5}]))
    for argv in (["--dataset", "random", "--random-range-ratio", "0.5"],
                 ["--dataset", "mixed", "--mix", "0.75:16,0.25:100", "--goodput", "ttft:60000"],
                 ["--dataset", "shared-prefix", "--num-groups", "2", "--prefix-len", "64",
                  "--suffix-len", "8", "--max-concurrency", "2"],
                 ["--dataset", "code", "--fim-ratio", "0.5"],
                 ["--dataset", "sharegpt", "--dataset-path", str(sharegpt)],
                 ["--dataset", "jsonl", "--dataset-path", str(jsonl)]):
        summary, records = measure(_args(*argv), server.url)
        assert (summary["completed"], summary["failed"]) == (12, 0), (argv, summary)
        assert summary["total_output_tokens"] > 0
        if argv[1] == "shared-prefix":  # 10 of 12 prompts reuse their group's 64 tokens
            assert summary["server"]["prefix_cache_hit_rate"] > 0.4
        if argv[1] == "mixed":  # 9 short and 3 long, each class reported on its own
            groups = summary["by_prompt_tokens"]
            assert {k: g["completed"] for k, g in groups.items()} == {"16": 9, "100": 3}
            assert all(g["ttft_s"]["p99"] > 0 and g["good"] == g["completed"]
                       for g in groups.values())


def test_mix_is_parsed_and_checked():
    assert datasets.parse_mix("0.8:256,0.2:8192") == [(0.8, 256), (0.2, 8192)]
    for bad in ("0.8:256", "0.5:10,0.6:20", "a:b", "0.5:0,0.5:3"):
        with pytest.raises(ValueError, match="--mix"):
            datasets.parse_mix(bad)


def test_code_dataset_has_fim_requests():
    tok = Tokenizer(default_model_dir())
    specs = datasets.code_dataset(tok, 20, os.path.join(HERE, "..", "..", "tandem"), 128, 16,
                                  0.5, 0, None, False)
    bodies = [json.loads(s.body) for s in specs]
    assert 3 <= sum("suffix" in b for b in bodies) <= 17
    assert all(0 < s.prompt_tokens <= 128 + 32 for s in specs)


def test_cli_contract_against_a_running_server(server, tmp_path):
    out = subprocess.run([sys.executable, "-m", "tandem", "bench", "serve", "--base-url",
                          server.url, "--num-prompts", "6", "--random-input-len", "16",
                          "--random-output-len", "4", "--ignore-eos", "--goodput", "ttft:5000",
                          "--save-result", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("device", "workload", "date", "command", "git_commit", "ttft_s", "tpot_s",
                "itl_s", "e2el_s", "goodput", "request_throughput", "output_throughput"):
        assert key in record, key
    assert record["completed"] == 6 and record["goodput"] > 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["requests"]) == 6 and saved["requests"][0]["output_tokens"] == 4
    # ... and `tandem cost` prices that saved result end to end
    cost = subprocess.run([sys.executable, "-m", "tandem", "cost", str(tmp_path / "r.json"),
                           "--gpu", "H100", "--tokens-per-month", "1e9", "--api", "gpt-4o-mini",
                           "--api", "mine=1,0.5,2", "--plot", str(tmp_path / "cost.png")],
                          capture_output=True, text=True, timeout=120)
    assert cost.returncode == 0, cost.stderr
    c = json.loads(cost.stdout.strip().splitlines()[-1])
    assert c["operating_point"]["output_tokens_per_s"] == pytest.approx(
        record["output_throughput"])
    assert c["self_hosted_usd_per_m_output"] == pytest.approx(
        2.99 / (record["output_throughput"] * 3600) * 1e6)
    assert [a["api"] for a in c["apis"]] == ["gpt-4o-mini", "mine"]
    assert c["apis"][1]["api_usd_per_month"] == pytest.approx(1000 * (0.6 + 0.05 + 0.6))
    assert c["verdict"].startswith("against gpt-4o-mini: ")
    assert (tmp_path / "cost.png").stat().st_size > 10_000


def _stub(*argv: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stub = subprocess.Popen([sys.executable, os.path.join(HERE, "stub_sse_server.py"),
                             str(port), *argv], stdout=subprocess.PIPE, text=True)
    assert stub.stdout.readline().strip() == "ready"
    return stub, f"http://127.0.0.1:{port}"


SPEC = datasets.RequestSpec(datasets.COMPLETIONS, b'{"prompt": "hi"}', 1, 2)


def test_client_sustains_1000_requests_per_second():
    """Tiny streamed requests against a stub server: the client is not the bottleneck. (It
    runs ~2,500/s on an idle 2-core box and fell to ~1,540/s with another test run beside
    it; 1,000/s is still far above the rates the benchmarks offer.)"""
    stub, url = _stub()
    try:
        n = 4000
        records, elapsed = asyncio.run(run_load(url, [SPEC] * n, [0.0] * n, 64))
    finally:
        stub.kill()
    assert all(r.ok and r.output_tokens == 2 for r in records)
    rate = n / elapsed
    print(f"\nclient: {rate:.0f} requests/s ({n} tiny streamed requests, 64 in flight)")
    assert rate >= 1000


def test_client_overhead_on_itl():
    """64 streams whose tokens leave the stub 10 ms apart: what the client measures above
    10 ms is its own overhead (and the stub's timer slack)."""
    stub, url = _stub("50", "10")
    try:
        records, _ = asyncio.run(run_load(url, [SPEC] * 64, [0.0] * 64, 64))
    finally:
        stub.kill()
    itl = sorted(g for r in records for g in r.itl_s)
    median, p99 = itl[len(itl) // 2], itl[int(len(itl) * 0.99)]
    print(f"\nclient ITL overhead at 64 streams: median {1000 * (median - 0.010):+.2f} ms, "
          f"p99 {1000 * (p99 - 0.010):+.2f} ms over a true 10 ms gap")
    assert all(r.output_tokens == 50 for r in records)
    assert 0.009 < median < 0.015  # the overhead is small against any real ITL


def test_sweep_writes_points_and_plots_then_plot_redraws(server, tmp_path):
    out = tmp_path / "sweep"
    run = subprocess.run([sys.executable, "-m", "tandem", "bench", "sweep", "--base-url",
                          server.url, "--concurrencies", "1,3", "--num-prompts", "6",
                          "--random-input-len", "16", "--random-output-len", "6",
                          "--ignore-eos", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert [p["point"] for p in summary["points"]] == ["c1", "c3"]
    points = sorted(out.glob("default_c*.json"))
    assert len(points) == 2 and all(json.loads(p.read_text())["completed"] == 6 for p in points)
    for png in ("throughput_ttft.png", "throughput_tpot.png", "pareto.png", "cdf.png"):
        assert (out / png).stat().st_size > 10_000
    lines = json.loads((out / "lines.json").read_text())
    # one configuration: a p50 and a p99 line of 2 points per throughput plot, one Pareto
    # front, and one CDF line per point
    assert [(l["label"], l["points"]) for l in lines["throughput_ttft"]] == \
        [("default median", 2), ("default p99", 2)]
    assert len(lines["pareto"]) == 1 and len(lines["cdf_ttft"]) == len(lines["cdf_itl"]) == 2
    assert [l["points"] for l in lines["cdf_ttft"]] == [6, 6]
    redraw = subprocess.run([sys.executable, "-m", "tandem", "bench", "plot", *map(str, points),
                             "--out", str(tmp_path / "again")], capture_output=True, text=True,
                            timeout=120)
    assert redraw.returncode == 0, redraw.stderr
    assert json.loads((tmp_path / "again" / "lines.json").read_text()) == lines
