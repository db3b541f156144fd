#!/usr/bin/env bash
# One H200 (sixteenth session, issue 12): the one-row FP8 GEMV with its e4m3 weights decoded
# by integer operations instead of cvt (quant_gemm._e4m3_bits, TANDEM_FP8_CAST_DECODE).
# Steps: the quantized-matmul GPU tests, the cast kernel's sweep over tiles and decodings
# (scripts/bench_quant_gemv.py --cast-only), and batch-1 decode 512 in / 256 out, bf16
# against FP8 with its head under each decoding in DECODES. All inside DEADLINE seconds.
# Usage: OUT=dir DEADLINE=560 DECODES="0 1 2" bash bench/run_fp8_cast_h200.sh [tests sweep latency]
. "$(dirname "$0")/common.sh"
L="--batch-size 1 --input-len 512 --output-len 256 --max-model-len 1024 --max-num-seqs 1
   --iters 3 --no-progress"
[ $# -gt 0 ] || set -- tests sweep latency
for what in "$@"; do
  case $what in
    tests) step quant-tests ${TESTS_S:-150} python3 -m pytest -q -rf --tb=short \
             tests/kernels/test_triton_quant.py -k "fp8 or int8"
           tail -2 "$OUT/quant-tests.log"; grep -E "^FAILED" "$OUT/quant-tests.log" | head -8 | cut -c1-200 ;;
    sweep) step gemv-sweep ${SWEEP_S:-200} python3 scripts/bench_quant_gemv.py --cast-only
           grep -v '^{' "$OUT/gemv-sweep.log" | grep -v "^  " | cut -c1-200 ;;
    latency) bench latency-bf16 120 latency $M $L
             for d in ${DECODES:-0 1 2}; do
               TANDEM_FP8_CAST_DECODE=$d bench latency-fp8-head-decode$d 120 latency $M \
                 --quantization bench/configs/quant-policies/fp8-with-head.json $L
             done ;;
  esac
done
