"""tandem against llama.cpp on this CPU, side by side, on the embedded model in float32.

Builds llama.cpp from the `llama-cpp-python` source distribution (the llama.cpp it
vendors), converts the model with that tree's `convert_hf_to_gguf.py` to an f32 GGUF, then
measures both engines in interleaved rounds, so both see the same machine load:

    batch 1, 128 in / 256 out   tandem bench latency  vs  llama-bench -p 0 -n 256 -d 128
    48 mixed prompts            tandem bench throughput --num-prompts 48
                                  --input-len-range 16 200 --output-len-range 16 128
                                vs  llama-batched-bench -npl 48 -npp P -ntg G (P, G: the
                                  means of tandem's prompt and output lengths; llama.cpp
                                  runs the 48 in lockstep, all of the same lengths)

Usage (not part of CI; needs cmake, a C++ compiler and PyPI):
    .venv/bin/python scripts/bench_llamacpp_cpu.py [--rounds 3] [--threads 2]
        [--cache-dir /tmp/tandem-llamacpp] [--llama-cpp-python-version 0.3.36]

Set-up steps, each skipped when its output exists in --cache-dir:
    pip download --no-binary :all: --no-deps llama-cpp-python==V -d CACHE/sdist
    tar xzf ...; cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON (CPU only)
    cmake --build build --target llama-bench llama-batched-bench
    pip install --target CACHE/convert-deps sentencepiece   (the converter imports it; its
        other needs, torch, numpy, safetensors and transformers, are tandem's venv's, and
        gguf is the vendored gguf-py)
    convert_hf_to_gguf.py tandem/assets/default_model --outtype f32
The converter does not know the embedded tokenizer's pre-tokenizer hash; it is GPT-2's
byte-level one, so the conversion names it "gpt-2" (the token ids both engines run are
random anyway).

Prints a table per round, the best and median of each figure, then one JSON line.
Figures: ms per output token at batch 1 (decode only: tandem's (total - TTFT) / (out - 1),
llama-bench's tg at depth 128); output tokens per second of the batch (output tokens over
the whole time, prompts included, on both sides).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# The converter, with unknown BPE pre-tokenizers taken as GPT-2's (see the docstring).
_CONVERT = """
import runpy, sys
tree = sys.argv.pop(1)
sys.path[:0] = [tree, tree + "/gguf-py"]
from conversion import base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
sys.argv[0] = tree + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + " ".join(map(str, cmd)))
    return subprocess.run(cmd, check=True, text=True, **kw)


def build_llamacpp(cache: Path, version: str | None, jobs: int) -> tuple[Path, str]:
    """(the vendored llama.cpp tree with build/bin, the llama-cpp-python version)."""
    sdist = cache / "sdist"
    if not list(sdist.glob("llama_cpp_python-*.tar.gz")):
        spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
        run([PY, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", spec,
             "-d", str(sdist)])
    archive = sorted(sdist.glob(f"llama_cpp_python-{version or ''}*.tar.gz"))[-1]
    name = archive.name[:-len(".tar.gz")]
    src = cache / "src" / name
    if not src.exists():
        with tarfile.open(archive) as tar:
            tar.extractall(cache / "src", filter="data")
    tree = src / "vendor" / "llama.cpp"
    bins = tree / "build" / "bin"
    if not (bins / "llama-bench").exists() or not (bins / "llama-batched-bench").exists():
        run(["cmake", "-S", str(tree), "-B", str(tree / "build"), "-DCMAKE_BUILD_TYPE=Release",
             "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_SERVER=OFF"], stdout=subprocess.DEVNULL)
        run(["cmake", "--build", str(tree / "build"), "-j", str(jobs), "--target",
             "llama-bench", "llama-batched-bench"], stdout=subprocess.DEVNULL)
    return tree, name.split("-", 1)[1]


def convert(cache: Path, tree: Path, model_dir: str) -> Path:
    out = cache / f"{Path(model_dir).name}-f32.gguf"
    if out.exists():
        return out
    deps = cache / "convert-deps"
    if not (deps / "sentencepiece").exists():
        run([PY, "-m", "pip", "install", "--quiet", "--target", str(deps), "sentencepiece"])
    env = dict(os.environ, PYTHONPATH=str(deps))
    run([PY, "-c", _CONVERT, str(tree), model_dir, "--outtype", "f32", "--outfile", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def busy_others() -> list[str]:
    """Other processes using a CPU now (ps's lifetime average above 20%), or pytest runs."""
    rows = subprocess.run(["ps", "-eo", "pcpu=,pid=,args="], capture_output=True,
                          text=True).stdout.splitlines()
    out = []
    for row in rows:
        pcpu, pid, cmd = row.split(None, 2)
        if int(pid) != os.getpid() and "ps -eo" not in cmd and (
                float(pcpu) > 20 or "pytest" in cmd):
            out.append(cmd.split()[0].rsplit("/", 1)[-1] + (" (pytest)" if "pytest" in cmd
                                                           else ""))
    return out


def load() -> str:
    """The 1-minute load average and the other processes busy right now (a shared box)."""
    others = busy_others()
    return f"load {os.getloadavg()[0]:.2f}" + (f", busy: {','.join(others)}" if others else "")


def wait_quiet(limit_s: float) -> float:
    """Wait up to limit_s for no other busy process; return the seconds waited."""
    t0 = time.monotonic()
    while busy_others() and time.monotonic() - t0 < limit_s:
        time.sleep(2)
    return time.monotonic() - t0


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def tandem_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads))


def tandem_latency(threads: int, flags: list[str]) -> dict:
    out = run([PY, "-m", "tandem", "bench", "latency", "--batch-size", "1", "--input-len",
               "128", "--output-len", "256", "--iters", "3", "--no-progress", *flags],
              capture_output=True, cwd=ROOT, env=tandem_env(threads)).stdout
    return last_json(out)


def tandem_throughput(threads: int, flags: list[str]) -> dict:
    out = run([PY, "-m", "tandem", "bench", "throughput", "--num-prompts", "48",
               "--input-len-range", "16", "200", "--output-len-range", "16", "128",
               "--no-progress", *flags], capture_output=True, cwd=ROOT, env=tandem_env(threads)).stdout
    return last_json(out)


def llama_bench(bins: Path, gguf: Path, threads: int) -> dict:
    out = run([str(bins / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0",
               "-n", "256", "-d", "128", "-r", "3", "-o", "json"], capture_output=True).stdout
    rec = json.loads(out)[0]
    return {"tokens_per_s": rec["avg_ts"], "ms_per_output_token": 1e3 / rec["avg_ts"],
            "samples_ts": rec.get("samples_ts"), "build_commit": rec.get("build_commit")}


def llama_batched(bins: Path, gguf: Path, threads: int, npp: int, ntg: int, npl: int) -> dict:
    out = run([str(bins / "llama-batched-bench"), "-m", str(gguf), "-t", str(threads),
               "-c", str(npl * (npp + ntg) + 256), "-b", "2048", "-ub", "512",
               "-npp", str(npp), "-ntg", str(ntg), "-npl", str(npl),
               "--output-format", "jsonl"], capture_output=True).stdout
    rec = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    rec["output_tokens_per_s"] = npl * ntg / rec["t"]
    return rec


def mixed_workload_means() -> tuple[int, int]:
    """The mean prompt and output lengths of tandem's 48-prompt mixed workload (seed 0)."""
    sys.path.insert(0, str(ROOT))
    from tandem.bench.cli import _throughput_workload
    args = argparse.Namespace(seed=0, num_prompts=48, input_len_range=(16, 200),
                              output_len_range=(16, 128), input_len=128, output_len=128)
    _, ins, outs = _throughput_workload(args, 8192)
    return round(statistics.mean(ins)), round(statistics.mean(outs))


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT).stdout.strip() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", default="/tmp/tandem-llamacpp")
    ap.add_argument("--llama-cpp-python-version", default=None,
                    help="the sdist to build (default: the newest on PyPI)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip", choices=("latency", "throughput"), action="append", default=[])
    ap.add_argument("--tandem-flag", action="append", default=[],
                    help="an extra flag for both tandem benchmarks (e.g. --enforce-eager: "
                         "the PyTorch forward, no fused CPU decode step)")
    ap.add_argument("--wait-quiet", type=float, default=300, metavar="S",
                    help="before each round, wait up to S seconds for other busy processes "
                         "(tests of others on a shared box) to end")
    args = ap.parse_args()
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from tandem.assets import default_model_dir
    model_dir = default_model_dir()
    tree, version = build_llamacpp(cache, args.llama_cpp_python_version,
                                   os.cpu_count() or 1)
    gguf = convert(cache, tree, model_dir)
    bins = tree / "build" / "bin"
    npp, ntg = mixed_workload_means()
    t = args.threads
    rounds = []
    for r in range(args.rounds):
        row: dict = {"round": r, "waited_for_quiet_s": round(wait_quiet(args.wait_quiet), 1)}
        if "latency" not in args.skip:
            row["load_before_latency"] = load()
            row["llamacpp_latency"] = llama_bench(bins, gguf, t)
            row["tandem_latency"] = tandem_latency(t, args.tandem_flag)
        if "throughput" not in args.skip:
            row["load_before_throughput"] = load()
            row["llamacpp_throughput"] = llama_batched(bins, gguf, t, npp, ntg, 48)
            row["tandem_throughput"] = tandem_throughput(t, args.tandem_flag)
        row["load_after"] = load()
        rounds.append(row)
        print(f"round {r}: " + "; ".join(
            f"{k} {v}" for k, v in _round_figures(row).items()), flush=True)

    summary = _summary(rounds)
    print()
    width = max(map(len, summary))
    for k, v in summary.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    record = {
        "benchmark": "tandem vs llama.cpp, CPU", "device": _device(t),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "model": "embedded default model (tandem/assets/"
        "default_model), float32; llama.cpp: f32 GGUF from its convert_hf_to_gguf.py",
        "llama_cpp_python": version, "threads": t, "tandem_flags": args.tandem_flag,
        "workloads": {
            "latency": "batch 1, 128 in / 256 out: tandem bench latency --batch-size 1 "
                       "--input-len 128 --output-len 256; llama-bench -p 0 -n 256 -d 128",
            "throughput": "48 prompts: tandem bench throughput --num-prompts 48 "
                          "--input-len-range 16 200 --output-len-range 16 128; "
                          f"llama-batched-bench -npl 48 -npp {npp} -ntg {ntg}"},
        "targets": {"latency_ratio_max": 1.0, "throughput_ratio_min": 1.3},
        **summary, "rounds": rounds}
    print(json.dumps(record))
    return 0


def _round_figures(row: dict) -> dict:
    out = {}
    if "tandem_latency" in row:
        out["tandem ms/token"] = round(row["tandem_latency"]["ms_per_output_token"], 3)
        out["llama.cpp ms/token"] = round(row["llamacpp_latency"]["ms_per_output_token"], 3)
    if "tandem_throughput" in row:
        out["tandem tok/s"] = round(row["tandem_throughput"]["output_tokens_per_s"], 1)
        out["llama.cpp tok/s"] = round(row["llamacpp_throughput"]["output_tokens_per_s"], 1)
    return out


def _summary(rounds: list[dict]) -> dict:
    """Best and median of each figure over the rounds, and the ratios of the medians and of
    the per-round pairs (each pair ran back to back)."""
    s: dict = {}
    lat = [r for r in rounds if "tandem_latency" in r]
    if lat:
        tm = [r["tandem_latency"]["ms_per_output_token"] for r in lat]
        lm = [r["llamacpp_latency"]["ms_per_output_token"] for r in lat]
        s |= {"tandem_ms_per_token_best": min(tm), "tandem_ms_per_token_median":
              statistics.median(tm), "llamacpp_ms_per_token_best": min(lm),
              "llamacpp_ms_per_token_median": statistics.median(lm),
              "latency_ratio_median_of_pairs": statistics.median(a / b for a, b in zip(tm, lm)),
              "latency_ratio_best": min(tm) / min(lm)}
    thr = [r for r in rounds if "tandem_throughput" in r]
    if thr:
        tt = [r["tandem_throughput"]["output_tokens_per_s"] for r in thr]
        lt = [r["llamacpp_throughput"]["output_tokens_per_s"] for r in thr]
        s |= {"tandem_tok_s_best": max(tt), "tandem_tok_s_median": statistics.median(tt),
              "llamacpp_tok_s_best": max(lt), "llamacpp_tok_s_median": statistics.median(lt),
              "throughput_ratio_median_of_pairs":
                  statistics.median(a / b for a, b in zip(tt, lt)),
              "throughput_ratio_best": max(tt) / max(lt)}
    return s


def _device(threads: int) -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({model}, {os.cpu_count()} cores, {threads} threads)"


if __name__ == "__main__":
    if shutil.which("cmake") is None:
        sys.exit("cmake is needed to build llama.cpp")
    sys.exit(main())
