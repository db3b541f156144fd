#!/usr/bin/env bash
# One H200: one token's MoE in one launch (kernels/triton/moe_one.py, TANDEM_MOE_ONE_LAUNCH,
# default on) against the two launches. Its GPU tests, the kernel sweep
# (scripts/bench_moe_decode.py), the Qwen3-30B-A3B graph replay both ways
# (scripts/diag_decode.py --env-ab), then `tandem bench latency` for issue 14 (Qwen3-30B-A3B
# and Mixtral-8x7B, 128 in / 256 out) with it on and off, alternating. Outputs under $OUT.
# Usage: OUT=dir DEADLINE=560 bash bench/run_moe_one_h200.sh [tests sweep diag latency]
. "$(dirname "$0")/common.sh"
B1="--batch-size 1 --input-len 128 --output-len 256 --max-model-len 1024 --max-num-seqs 1
    --iters 3 --no-progress"
[ $# -gt 0 ] || set -- tests sweep diag latency
for what in "$@"; do
  case $what in
    tests) step gpu-tests ${TESTS_S:-150} python3 -m pytest -q -rf --tb=short -m gpu \
             tests/kernels/test_triton_fused_moe.py tests/gpu/test_moe_cuda.py
           tail -2 "$OUT/gpu-tests.log"; grep -E "^FAILED" "$OUT/gpu-tests.log" | head -8 | cut -c1-200 ;;
    sweep) step moe-decode ${SWEEP_S:-200} python3 scripts/bench_moe_decode.py ${SWEEP_ARGS:-}
           grep -E "two launches|BEST|default" "$OUT/moe-decode.log"
           # the Qwen3 sweep's best tiles for the steps after it (TANDEM_MOE_ONE_CONFIG)
           best=$(tail -1 "$OUT/moe-decode.log" | python3 -c 'import json,sys
r=json.loads(sys.stdin.read())["rows"]; print(",".join(map(str, r[0]["best_config"])))' 2>/dev/null)
           [ -n "$best" ] && export TANDEM_MOE_ONE_CONFIG=$best && echo "== tiles $best" ;;
    diag) step diag-qwen3 120 python3 scripts/diag_decode.py bench/configs/qwen3-30b-a3b \
            /tmp/trace.json --env-ab TANDEM_MOE_ONE_LAUNCH=1,0 --json "$OUT/diag-qwen3.json"
          grep "^== " "$OUT/diag-qwen3.log" | cut -c1-150 ;;
    latency) for v in ${ORDER:-1 0 1 0}; do
               for m in ${MODELS:-qwen3}; do
                 export TANDEM_MOE_ONE_LAUNCH=$v
                 bench latency-$m-one$v-$(date +%s) 100 latency \
                   --model bench/configs/$([ $m = qwen3 ] && echo qwen3-30b-a3b || echo mixtral-8x7b) \
                   --load-format dummy $B1
               done
             done
             unset TANDEM_MOE_ONE_LAUNCH ;;
  esac
done
