#!/usr/bin/env bash
# Issue 5's benchmarks on one H100 (Llama-3.1-8B shapes, dummy bf16 weights). Each JSON
# record (the last stdout line of each command) goes to $OUT/<name>.json; the full output
# to $OUT/<name>.log. Usage: OUT=dir bash bench/run_h100.sh [latency prefill throughput]
set -u
OUT=${OUT:-bench/results/tmp}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
M="--model bench/configs/llama-3.1-8b --load-format dummy"
run() {  # name, timeout, args...
  local name=$1 t=$2; shift 2
  timeout "$t" python3 -m tandem bench "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$?"; tail -8 "$OUT/$name.log" | grep -v '^{'
  tail -1 "$OUT/$name.log" | grep '^{' > "$OUT/$name.json" || rm -f "$OUT/$name.json"
}
[ $# -gt 0 ] || set -- latency prefill throughput
for what in "$@"; do
  case $what in
    latency) run latency 240 latency $M --batch-size 1 --input-len 128 --output-len 256 \
               --max-model-len 4096 --max-num-seqs 1 --iters 3 ;;
    prefill) run prefill 240 prefill $M --input-len 8192 --max-num-batched-tokens 8192 \
               --max-model-len 8448 --max-num-seqs 1 --iters 3 ;;
    throughput) run throughput 420 throughput $M --num-prompts 1024 --input-len 512 \
               --output-len 256 --max-model-len 1024 --max-num-seqs 512 --backend transformers \
               --peer-num-prompts ${PEER_PROMPTS:-128} ;;
  esac
done
