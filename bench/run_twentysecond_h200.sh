#!/usr/bin/env bash
# One H200 (twenty-second session, issues 12 and 16). Steps, all inside DEADLINE seconds:
#   kvdef tests   bench/run_twentyfirst_h200.sh's steps: FP8 KV against bf16 KV at
#                 256 x 4096/256 with the default tiles, then the attention GPU tests
#   onetime       scripts/diag_one_time.py on the FP8 KV run: compiles inside its window
#   prefill       the prefill kernel with each row's max taken before the scale (one FFMA an
#                 element) against the kernel before ($OLD_PREFILL: 667b929's prefill.py,
#                 copied in untracked as bench/ab/prefill_old.py for the session's call),
#                 scripts/bench_prefill_tma.py new, old, new, old; then the 8k prefill
#                 benchmark and the attention GPU tests on the new kernel
#   power         issue 16's throughput (1024 x 512/256) and 8k prefill runs, bf16, each
#                 under scripts/diag_power.py (board power, SM clock, power-cap share)
# Needs no server wheels. Usage:
#   OUT=dir DEADLINE=570 bash bench/run_twentysecond_h200.sh [kvdef tests onetime prefill power]
. "$(dirname "$0")/common.sh"
[ $# -gt 0 ] || set -- kvdef tests power
for what in "$@"; do
  case $what in
    kvdef|tests) OUT=$OUT DEADLINE=$(left) bash "$(dirname "$0")/run_twentyfirst_h200.sh" $what ;;
    onetime) step one-time-fp8 ${ONE_S:-150} python3 scripts/diag_one_time.py $M \
               --kv-cache-dtype fp8 --num-prompts 256 --input-len 4096 --output-len 256 \
               --max-model-len 4352 --max-num-seqs 256 --no-progress
             grep -v '^{' "$OUT/one-time-fp8.log" | tail -12 ;;
    prefill)
      P=tandem/kernels/triton/prefill.py; cp $P /tmp/prefill_new.py
      for r in new-1 old-1 new-2 old-2; do
        case $r in old*) cp "${OLD_PREFILL:-bench/ab/prefill_old.py}" $P ;; *) cp /tmp/prefill_new.py $P ;; esac
        step prefill-ab-$r 60 python3 scripts/bench_prefill_tma.py --json "$OUT/prefill-ab-$r.json"
        grep -E "default " "$OUT/prefill-ab-$r.log" | sed "s/^/$r  /"
      done
      cp /tmp/prefill_new.py $P
      bench prefill-8k 80 prefill $M --input-len 8192 --max-num-batched-tokens 8192 \
        --max-model-len 8448 --max-num-seqs 1 --iters 3 --no-progress
      step attn-tests ${TESTS_S:-150} python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
        tests/kernels/test_triton_attention.py
      tail -2 "$OUT/attn-tests.log"; grep -E "^FAILED" "$OUT/attn-tests.log" | head -8 | cut -c1-200 ;;
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
