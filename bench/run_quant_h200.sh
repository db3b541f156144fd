#!/usr/bin/env bash
# Issue 12's GPU runs on one H200: Llama-3.1-8B shapes, dummy weights quantized at load.
# Each JSON record (the last stdout line of a command) goes to $OUT/<name>.json, the full
# output to $OUT/<name>.log. Usage: OUT=dir bash bench/run_quant_h200.sh [latency latency-head throughput prefill kv]
. "$(dirname "$0")/common.sh"
q() { [ "$1" = bf16 ] || echo "--quantization $1"; }
[ $# -gt 0 ] || set -- latency throughput prefill
for what in "$@"; do
  case $what in
    latency-head) for p in ${POLICIES:-int8-with-head int4-with-head int4-int8-head fp8-with-head}; do
               # the method on the LM head too (bench/configs/quant-policies/), as gpt-fast
               # and torchao quantize every linear
               run latency-$p 200 latency $M --quantization bench/configs/quant-policies/$p.json \
                 --batch-size 1 --input-len 512 --output-len 256 --max-model-len 1024 \
                 --max-num-seqs 1 --iters 3 --no-progress
             done ;;
    latency) for m in ${METHODS:-bf16 int8 int4 fp8}; do
               run latency-$m 200 latency $M $(q $m) --batch-size 1 --input-len 512 \
                 --output-len 256 --max-model-len 1024 --max-num-seqs 1 --iters 3 --no-progress
             done ;;
    throughput) for m in ${METHODS:-bf16 fp8}; do
               run throughput-$m 300 throughput $M $(q $m) --num-prompts 1024 --input-len 512 \
                 --output-len 256 --max-model-len 1024 --max-num-seqs 512 --no-progress
             done ;;
    prefill) for m in ${METHODS:-bf16 fp8}; do
               run prefill-$m 200 prefill $M $(q $m) --input-len 8192 \
                 --max-num-batched-tokens 8192 --max-model-len 8448 --max-num-seqs 1 --iters 3 \
                 --no-progress
             done ;;
    kv) for kv in auto fp8; do  # long context: 256 x 4096 in / 256 out, KV dtype only
          run kv-$kv 300 throughput $M --kv-cache-dtype $kv --num-prompts 256 \
            --input-len 4096 --output-len 256 --max-model-len 4352 --max-num-seqs 256 \
            --no-progress
        done ;;
  esac
done
