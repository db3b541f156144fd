#!/usr/bin/env bash
# One H200 (sixteenth session, issue 12): the one-row FP8 W8A8 GEMV with fp16 products and
# sums of eight (quant_gemm._float_tile, TANDEM_FP8_CAST_HALF). Steps: its GPU tests, the cast
# kernel's sweep (scripts/bench_quant_gemv.py --cast-only), and batch-1 decode 512 in / 256
# out, bf16 against FP8 with its head, half off and on. All inside DEADLINE seconds.
# amax: bf16, then FP8 with its head (half on) with the amax pass in BLOCK_K loads (as
# before), eight values a thread (auto) and loads of up to 4096 (TANDEM_FP8_AMAX_K), twice.
# diag: the batch-1 step's kernels (scripts/diag_decode.py, PDL on and off), FP8 with its
# head with half on, and bf16.
# Usage: OUT=dir DEADLINE=360 bash bench/run_fp8_half_h200.sh [tests sweep latency amax diag]
. "$(dirname "$0")/common.sh"
L="--batch-size 1 --input-len 512 --output-len 256 --max-model-len 1024 --max-num-seqs 1
   --iters 3 --no-progress"
[ $# -gt 0 ] || set -- tests sweep latency
for what in "$@"; do
  case $what in
    tests) step quant-tests ${TESTS_S:-90} python3 -m pytest -q -rf --tb=short \
             tests/kernels/test_triton_quant.py -k "${TESTS_K:-fp8_cast or fp8_gemv}"
           tail -2 "$OUT/quant-tests.log"; grep -E "^FAILED" "$OUT/quant-tests.log" | head -8 | cut -c1-200 ;;
    sweep) step gemv-sweep ${SWEEP_S:-120} python3 scripts/bench_quant_gemv.py --cast-only
           grep -v '^{' "$OUT/gemv-sweep.log" | cut -c1-160 ;;
    latency) bench latency-bf16 60 latency $M $L
             for h in 0 1; do
               TANDEM_FP8_CAST_HALF=$h bench latency-fp8-head-half$h 60 latency $M \
                 --quantization bench/configs/quant-policies/fp8-with-head.json $L
             done ;;
    amax) bench latency-bf16-a 60 latency $M $L
          for r in a b; do
            for a in 0 auto 4096; do
              TANDEM_FP8_AMAX_K=$a bench latency-fp8-amax$a-$r 60 latency $M \
                --quantization bench/configs/quant-policies/fp8-with-head.json $L
            done
          done
          bench latency-bf16-b 60 latency $M $L ;;
    diag) TANDEM_FP8_CAST_HALF=1 step diag-fp8-half ${DIAG_S:-120} python3 scripts/diag_decode.py \
            bench/configs/llama-3.1-8b /tmp/t.json bench/configs/quant-policies/fp8-with-head.json \
            --pdl-ab --json "$OUT/diag-fp8-half.json"
          step diag-bf16 ${DIAG_S:-120} python3 scripts/diag_decode.py bench/configs/llama-3.1-8b \
            /tmp/t.json --pdl-ab --json "$OUT/diag-bf16.json"
          grep -A14 "^== TANDEM" "$OUT/diag-fp8-half.log" "$OUT/diag-bf16.log" | cut -c1-110 ;;
  esac
done
