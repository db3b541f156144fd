#!/usr/bin/env bash
# One H200 (seventeenth session): the FP8 W8A8 one-row GEMV's amax pass in one load
# (issue 12's batch-1 1.6x) and one-time costs inside the long-context throughput runs
# (issue 12's FP8 KV 1.15x). All inside DEADLINE seconds.
# Usage: OUT=dir DEADLINE=560 bash bench/run_seventeenth_h200.sh
. "$(dirname "$0")/common.sh"
DEADLINE=280 TESTS_S=80 TESTS_K="fp8 or quant or gemv" bash bench/run_fp8_half_h200.sh tests amax \
  | grep -E "^==|ms per output|fraction|passed|failed|FAILED"
K="--num-prompts 256 --input-len 4096 --output-len 256 --max-model-len 4352 --max-num-seqs 256 --no-progress"
for kv in fp8 auto; do
  step one-time-$kv 140 python3 scripts/diag_one_time.py $M --kv-cache-dtype $kv $K
  grep -E "^start-up|^bench|^again" "$OUT/one-time-$kv.log" | cut -c1-300
done
step one-time-throughput 120 python3 scripts/diag_one_time.py $M --num-prompts 1024 \
  --input-len 512 --output-len 256 --max-model-len 1024 --max-num-seqs 512 --no-progress
grep -E "^start-up|^bench|^again" "$OUT/one-time-throughput.log" | cut -c1-300
