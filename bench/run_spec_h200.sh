#!/usr/bin/env bash
# Issue 13's GPU runs on one H200: Llama-3.1-8B shapes, dummy weights. Each JSON record
# (the last stdout line) goes to $OUT/<name>.json, the output to $OUT/<name>.log.
# Usage: OUT=dir bash bench/run_spec_h200.sh [latency throughput]
. "$(dirname "$0")/common.sh"
SYN='{"method": "ngram", "num_speculative_tokens": 4, "synthetic_acceptance_rate": 0.8}'
REAL='{"method": "ngram", "num_speculative_tokens": 4}'
[ $# -gt 0 ] || set -- latency throughput
for what in "$@"; do
  case $what in
    latency)
      L="latency $M --batch-size 1 --input-len 512 --output-len 256 --max-model-len 1024
         --max-num-seqs 1 --iters 3 --no-progress"
      run latency-off 200 $L
      run latency-synthetic 200 $L --speculative-config "$SYN"
      run latency-ngram 200 $L --speculative-config "$REAL" ;;
    throughput)
      T="throughput $M --num-prompts 256 --input-len 512 --output-len 128 --max-model-len 1024
         --max-num-seqs 256 --no-progress"
      run throughput-off 200 $T
      run throughput-ngram 200 $T --speculative-config "$REAL" ;;
  esac
done
