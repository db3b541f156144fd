#!/usr/bin/env bash
# Issue 5's benchmarks on one H100 (Llama-3.1-8B shapes, dummy bf16 weights). Each JSON
# record (the last stdout line of each command) goes to $OUT/<name>.json; the full output
# to $OUT/<name>.log. Usage: OUT=dir bash bench/run_h100.sh [latency prefill throughput]
. "$(dirname "$0")/common.sh"
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
