#!/usr/bin/env bash
# Issue 10's serving runs on one H200: Llama-3.1-8B shapes (dummy bf16 weights, a word-level
# shape tokenizer so the server detokenizes and streams text), random 512-in / 256-out
# prompts, EOS ignored. Offline references first (throughput with the same workload as the
# sweep's concurrency-512 point; batch-1 latency for the concurrency-1 point), then the
# concurrency sweep of `tandem serve`, then a py-spy profile of the server at 512.
# Usage: OUT=dir [CONC=1,512] bash bench/run_serve_h200.sh [throughput latency sweep profile]
set -u
OUT=${OUT:-bench/results/tmp}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The device's copy may carry a stale .git: report the commit written here beforehand.
[ -f .bench_commit ] && export TANDEM_GIT_COMMIT=${TANDEM_GIT_COMMIT:-$(cat .bench_commit)}
M=/tmp/llama-3.1-8b
python3 -m tandem.bench.shape_tokenizer bench/configs/llama-3.1-8b $M > /dev/null
E="--load-format dummy --max-model-len 1024 --max-num-seqs 512"
W="--random-input-len 512 --random-output-len 256 --ignore-eos"
last() { tail -1 "$1" | grep '^{' > "${1%.log}.json" || rm -f "${1%.log}.json"; }
[ $# -gt 0 ] || set -- throughput latency sweep profile
for what in "$@"; do
  case $what in
    throughput) timeout 420 python3 -m tandem bench throughput --model $M $E --num-prompts 1024 \
                  --input-len 512 --output-len 256 > "$OUT/throughput.log" 2>&1
                echo "== throughput rc=$?"; last "$OUT/throughput.log"; tail -6 "$OUT/throughput.log" | grep -v '^{' ;;
    latency) timeout 300 python3 -m tandem bench latency --model $M --load-format dummy \
               --batch-size 1 --input-len 512 --output-len 256 --max-model-len 1024 \
               --max-num-seqs 1 --iters 3 > "$OUT/latency.log" 2>&1
             echo "== latency rc=$?"; last "$OUT/latency.log"; tail -6 "$OUT/latency.log" | grep -v '^{' ;;
    sweep) timeout 900 python3 -m tandem bench sweep --model $M --serve-args "$E" $W \
             --concurrencies ${CONC:-1,8,32,128,512} --num-prompts 8 --min-rounds 2 --no-progress \
             --out "$OUT/sweep" > "$OUT/sweep.log" 2>&1
           echo "== sweep rc=$?"; last "$OUT/sweep.log"; grep -v '^{' "$OUT/sweep.log" | tail -8 ;;
    profile) python3 - "$M" "$E" "$W" "$OUT" <<'PY'
import shlex, subprocess, sys, time
from tandem.bench.serve_cli import start_server, stop_server
model, engine, work, out = sys.argv[1:]
proc, url = start_server(model, engine, f"{out}/profile.server.log")
try:
    bench = subprocess.Popen([sys.executable, "-m", "tandem", "bench", "serve", "--base-url", url,
                              "--model", model, *shlex.split(work), "--max-concurrency", "512",
                              "--num-prompts", "1536", "--no-progress"],
                             stdout=open(f"{out}/profile.bench.log", "w"), stderr=subprocess.STDOUT)
    time.sleep(20)  # past warm-up and the first prefills
    subprocess.run(["py-spy", "record", "-p", str(proc.pid), "-d", "15", "-r", "200", "-f", "raw",
                    "--subprocesses",
                    "--threads", "--nonblocking", "-o", f"{out}/profile.txt"], timeout=60)
    bench.wait(timeout=300)
finally:
    stop_server(proc)
print("== profile done")
PY
    ;;
  esac
done
