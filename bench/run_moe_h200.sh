#!/usr/bin/env bash
# Issue 14's GPU runs on one H200, dummy weights: Qwen3-30B-A3B shapes (batch-1 decode,
# offline throughput 1024 x 512/256) and Mixtral-8x7B shapes (batch-1 decode). Each JSON
# record goes to $OUT/<name>.json, the output to $OUT/<name>.log.
# Usage: OUT=dir bash bench/run_moe_h200.sh [qwen-latency qwen-throughput mixtral-latency]
. "$(dirname "$0")/common.sh"
Q="--model bench/configs/qwen3-30b-a3b --load-format dummy"
X="--model bench/configs/mixtral-8x7b --load-format dummy"
L="--batch-size 1 --input-len 128 --output-len 256 --max-model-len 1024 --max-num-seqs 1
   --iters 3 --no-progress"
[ $# -gt 0 ] || set -- qwen-latency qwen-throughput mixtral-latency
for what in "$@"; do
  case $what in
    qwen-latency) run qwen3-30b-a3b-latency 240 latency $Q $L ;;
    qwen-throughput) run qwen3-30b-a3b-throughput 300 throughput $Q --num-prompts 1024 \
                       --input-len 512 --output-len 256 --max-model-len 1024 \
                       --max-num-seqs 512 --no-progress ;;
    mixtral-latency) run mixtral-8x7b-latency 300 latency $X $L ;;
  esac
done
