#!/usr/bin/env bash
# One H200: rotary + K/V write inside the decode launch (TANDEM_DECODE_ROTARY, default on).
# Its GPU tests, the graph replay with it on and off (scripts/diag_decode.py --env-ab), then
# `tandem bench latency` for issue 16 (bf16, 128 in / 256 out), issue 12 (bf16 and INT4 with
# its head, 512 in / 256 out) and issue 14 (Qwen3-30B-A3B, 128 in / 256 out), all inside
# DEADLINE seconds (each step gets what is left). Outputs under $OUT.
# Usage: OUT=dir DEADLINE=560 bash bench/run_decode_rotary_h200.sh [tests diag latency]
. "$(dirname "$0")/common.sh"
B1="--batch-size 1 --output-len 256 --max-model-len 1024 --max-num-seqs 1 --iters 3 --no-progress"
HEAD=bench/configs/quant-policies
[ $# -gt 0 ] || set -- tests diag latency
for what in "$@"; do
  case $what in
    tests) step gpu-tests ${TESTS_S:-300} python3 -m pytest -q -rf --tb=short -m gpu \
             tests/kernels/test_triton_decode_rotary.py tests/kernels/test_triton_rotary_write_kv.py \
             tests/gpu/test_spec_decode_cuda.py tests/gpu/test_engine_cuda.py \
             tests/kernels/test_triton_carried_norm.py tests/kernels/test_triton_attention.py \
             -k "not long and not chain_decode and not prefill and not mixed"
           tail -2 "$OUT/gpu-tests.log"; grep -E "^FAILED" "$OUT/gpu-tests.log" | head -8 | cut -c1-200 ;;
    diag) for p in ${DIAG:-int4-with-head}; do
            q=$HEAD/$p.json; [ "$p" = bf16 ] && q=
            step diag-$p 100 python3 scripts/diag_decode.py bench/configs/llama-3.1-8b \
              /tmp/trace.json $q --env-ab TANDEM_DECODE_ROTARY=1,0 --json "$OUT/diag-$p.json"
            grep "^== " "$OUT/diag-$p.log" | cut -c1-150
          done ;;
    latency) for p in ${LATENCY:-bf16-128 bf16 int4-with-head int8-with-head qwen3}; do
               case $p in
                 bf16-128) bench latency-bf16-128 70 latency $M --input-len 128 $B1 ;;
                 bf16) bench latency-bf16 70 latency $M --input-len 512 $B1 ;;
                 qwen3) bench latency-qwen3 90 latency --model bench/configs/qwen3-30b-a3b \
                          --load-format dummy --input-len 128 $B1 ;;
                 *) bench latency-$p 70 latency $M --quantization $HEAD/$p.json --input-len 512 $B1 ;;
               esac
             done ;;
  esac
done
