#!/usr/bin/env bash
# Issue 15's runs on one H200: the disaggregation GPU tests, the KV path's bandwidth stage
# by stage (scripts/bench_kv_transfer.py, Llama-3.1-8B shapes), and a served 1P1D pair
# sharing the GPU (Llama-3.1-8B shapes, dummy weights) under long prompts, with the
# transfer series of its /metrics. Usage: OUT=dir bash bench/run_disagg_h200.sh [tests bw serve]
set -u
OUT=${OUT:-bench/results/tmp}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -f .bench_commit ] && export TANDEM_GIT_COMMIT=${TANDEM_GIT_COMMIT:-$(cat .bench_commit)}
[ $# -gt 0 ] || set -- tests bw serve
for what in "$@"; do
  case $what in
    tests) timeout 400 python3 -m pytest -q -s -m gpu tests/gpu/test_disagg_cuda.py \
             > "$OUT/gpu-tests.log" 2>&1; echo "== tests rc=$?"; tail -4 "$OUT/gpu-tests.log" ;;
    bw) timeout 300 python3 scripts/bench_kv_transfer.py --tokens 512,2048,8192 \
          > "$OUT/kv-transfer.log" 2>&1; echo "== bw rc=$?"
        grep -v '^{' "$OUT/kv-transfer.log" | tail -6
        tail -1 "$OUT/kv-transfer.log" | grep '^{' > "$OUT/kv-transfer.json" ;;
    serve) M=/tmp/llama-3.1-8b
           python3 -m tandem.bench.shape_tokenizer bench/configs/llama-3.1-8b $M > /dev/null
           timeout 500 python3 - "$M" "$OUT" <<'PY'
import subprocess, sys, urllib.request
from tandem.bench.serve_cli import start_server, stop_server
model, out = sys.argv[1:]
engine = ("--load-format dummy --max-model-len 8448 --max-num-seqs 64 "
          "--gpu-memory-utilization 0.42 --prefill-workers 1 --disagg-policy always")
proc, url = start_server(model, engine, f"{out}/serve-1p1d.server.log")
try:
    with open(f"{out}/serve-1p1d.log", "w") as log:
        subprocess.run([sys.executable, "-m", "tandem", "bench", "serve", "--base-url", url,
                        "--model", model, "--random-input-len", "4096",
                        "--random-output-len", "64", "--ignore-eos", "--num-prompts", "32",
                        "--request-rate", "4", "--no-progress"], stdout=log,
                       stderr=subprocess.STDOUT, timeout=300)
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    keep = [l for l in text.splitlines() if not l.startswith("#") and any(
        k in l for k in ("disagg_requests_total", "kv_transfer_bytes_total",
                         "kv_transfer_blocks_total", "kv_transfer_seconds_sum",
                         "kv_transfer_seconds_count", "kv_transfer_failures_total"))]
    open(f"{out}/serve-1p1d.metrics.txt", "w").write("\n".join(keep) + "\n")
    print("\n".join(keep))
finally:
    stop_server(proc)
PY
           echo "== serve rc=$?"; grep -v '^{' "$OUT/serve-1p1d.log" | tail -14 ;;
  esac
done
