#!/usr/bin/env bash
# One H200, batch-1 decode A/B runs (tenth session): one token's MoE in one launch
# (TANDEM_MOE_ONE_LAUNCH) and the decode attention's shortest partition
# (TANDEM_DECODE_MIN_PART). Steps: the GPU tests of the kernels touched, the MoE and decode
# attention micro-benchmarks, the graph replay under each value of AB
# (scripts/diag_decode.py --env-ab), and `tandem bench latency` (128 in / 256 out) under
# each value of AB in turn, ROUNDS times, for MODELS (qwen3, mixtral, llama). All inside
# DEADLINE seconds. Outputs under $OUT.
# Usage: OUT=dir AB=TANDEM_DECODE_MIN_PART=64,128 MODELS="qwen3 llama" ROUNDS=2 \
#        bash bench/run_batch1_h200.sh [tests moe attention diag latency]
. "$(dirname "$0")/common.sh"
B1="--batch-size 1 --input-len 128 --output-len 256 --max-model-len 1024 --max-num-seqs 1
    --iters 3 --no-progress"
AB=${AB:-TANDEM_MOE_ONE_LAUNCH=auto,0}
name=${AB%%=*}; values=${AB#*=}
config() { case $1 in qwen3) echo qwen3-30b-a3b ;; mixtral) echo mixtral-8x7b ;;
           *) echo llama-3.1-8b ;; esac; }
[ $# -gt 0 ] || set -- tests moe attention diag latency
for what in "$@"; do
  case $what in
    tests) step gpu-tests ${TESTS_S:-200} python3 -m pytest -q -rf --tb=short -m gpu \
             ${TEST_FILES:-tests/kernels/test_triton_fused_moe.py tests/gpu/test_moe_cuda.py \
             tests/kernels/test_triton_attention.py tests/kernels/test_triton_decode_rotary.py} \
             -k "not long"
           tail -2 "$OUT/gpu-tests.log"; grep -E "^FAILED" "$OUT/gpu-tests.log" | head -8 | cut -c1-200 ;;
    moe) step moe-decode 120 python3 scripts/bench_moe_decode.py ${MOE_ARGS:---quick}
         grep -E "two launches|BEST|default" "$OUT/moe-decode.log" ;;
    attention) step decode-attention 120 python3 scripts/bench_decode_attention.py --quick \
                 --json "$OUT/decode-attention.json"
               grep -E "^[a-z]|us " "$OUT/decode-attention.log" | cut -c1-80 ;;
    diag) for m in ${DIAG:-qwen3}; do
            step diag-$m 120 python3 scripts/diag_decode.py bench/configs/$(config $m) \
              /tmp/trace.json --env-ab "$AB" --json "$OUT/diag-$m.json"
            grep "^== " "$OUT/diag-$m.log" | cut -c1-150
          done ;;
    latency) for r in $(seq ${ROUNDS:-2}); do
               for v in ${values//,/ }; do
                 export "$name=$v"
                 for m in ${MODELS:-qwen3}; do
                   bench latency-$m-$v-$r 100 latency --model bench/configs/$(config $m) \
                     --load-format dummy $B1
                 done
               done
             done
             unset "$name" ;;
  esac
done
