#!/usr/bin/env bash
# One H200 (twenty-second session, issues 12 and 16). Steps, all inside DEADLINE seconds:
#   kvdef tests   bench/run_twentyfirst_h200.sh's steps: FP8 KV against bf16 KV at
#                 256 x 4096/256 with the default tiles, then the attention GPU tests
#   onetime       scripts/diag_one_time.py on the FP8 KV run: compiles inside its window
#   power         issue 16's throughput (1024 x 512/256) and 8k prefill runs, bf16, each
#                 under scripts/diag_power.py (board power, SM clock, power-cap share)
# Needs no server wheels. Usage:
#   OUT=dir DEADLINE=570 bash bench/run_twentysecond_h200.sh [kvdef tests onetime power]
. "$(dirname "$0")/common.sh"
[ $# -gt 0 ] || set -- kvdef tests power
for what in "$@"; do
  case $what in
    kvdef|tests) OUT=$OUT DEADLINE=$(left) bash "$(dirname "$0")/run_twentyfirst_h200.sh" $what ;;
    onetime) step one-time-fp8 ${ONE_S:-150} python3 scripts/diag_one_time.py $M \
               --kv-cache-dtype fp8 --num-prompts 256 --input-len 4096 --output-len 256 \
               --max-model-len 4352 --max-num-seqs 256 --no-progress
             grep -v '^{' "$OUT/one-time-fp8.log" | tail -12 ;;
    power)
      nvidia-smi -q -d POWER,CLOCK > "$OUT/nvidia-smi-power.txt" 2>&1
      step throughput-power ${TP_S:-150} python3 scripts/diag_power.py \
        --json "$OUT/throughput-power.json" -- python3 -m tandem bench throughput $M \
        --num-prompts 1024 --input-len 512 --output-len 256 --max-model-len 1024 \
        --max-num-seqs 512 --no-progress
      step prefill-power ${PF_S:-90} python3 scripts/diag_power.py \
        --json "$OUT/prefill-power.json" -- python3 -m tandem bench prefill $M \
        --input-len 8192 --max-num-batched-tokens 8192 --max-model-len 8448 \
        --max-num-seqs 1 --iters 3 --no-progress
      for f in throughput prefill; do
        grep '^{"benchmark' "$OUT/$f-power.log" > "$OUT/$f-bf16.json"
        grep -E "roofline|fraction|tok/s|TTFT" "$OUT/$f-power.log" | head -6
        sed -n '/^figure/,/^{/p' "$OUT/$f-power.log" | grep -v '^{'
      done ;;
  esac
done
