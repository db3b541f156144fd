#!/usr/bin/env bash
# One H200 (eighteenth session, issue 12): FP8 W8A8 carries the batch-1 RMSNorms
# (models/norm_chain.py), its consumers taking the producers' max |xn| instead of a pass over
# the row. Steps, all inside DEADLINE seconds:
#   tests    the carried-norm GPU tests (FP8 added), the FP8 GEMV tests, the bf16 GEMV tests
#   latency  batch-1 decode 512 in / 256 out: bf16, then FP8 with its head with the chain on
#            (the default) and off (TANDEM_NORM_CHAIN=0), twice, interleaved, then bf16
#   diag     the FP8 step's kernels, chain off and on (scripts/diag_decode.py --env-ab)
#   chain    bf16 batch-1 128 in / 256 out (issue 16's figure) with the chain off (the
#            default) and on (TANDEM_NORM_CHAIN=all), twice
#   quant    batch-1 512 in / 256 out: bf16, then INT4, INT8 and FP8 with their heads, twice
#   (184b19a ran `chain` with a third variant, TANDEM_NORM_EARLY=1, since removed, and FP8
#   with it; see bench/results/2026-12-02-h200-eighteenth-184b19a/)
# Outputs under $OUT. Carry the server wheels as .whl/site.tar.xz, then:
#   mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
# Usage: OUT=dir DEADLINE=570 bash bench/run_eighteenth_h200.sh [tests latency diag chain quant]
. "$(dirname "$0")/common.sh"
L="--batch-size 1 --input-len 512 --output-len 256 --max-model-len 1024 --max-num-seqs 1
   --iters 3 --no-progress"
Q="--quantization bench/configs/quant-policies/fp8-with-head.json"
S="--batch-size 1 --input-len 128 --output-len 256 --max-model-len 1024 --max-num-seqs 1
   --iters 3 --no-progress"
P=bench/configs/quant-policies
[ $# -gt 0 ] || set -- tests latency
for what in "$@"; do
  case $what in
    tests) step gpu-tests ${TESTS_S:-240} python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
             tests/kernels/test_triton_carried_norm.py tests/kernels/test_triton_gemv.py \
             tests/kernels/test_triton_quant.py -k "${TESTS_K:-carried_norm or test_triton_gemv or fp8_cast or fp8_gemv or quantized_model}"
           tail -2 "$OUT/gpu-tests.log"; grep -E "^FAILED" "$OUT/gpu-tests.log" | head -8 | cut -c1-200 ;;
    latency) bench latency-bf16-a 60 latency $M $L
             for r in a b; do
               bench latency-fp8-chain-$r 60 latency $M $Q $L
               TANDEM_NORM_CHAIN=0 bench latency-fp8-plain-$r 60 latency $M $Q $L
             done
             bench latency-bf16-b 60 latency $M $L ;;
    chain) for r in a b; do
             bench bf16-128-plain-$r 60 latency $M $S
             TANDEM_NORM_CHAIN=all bench bf16-128-chain-$r 60 latency $M $S
           done ;;
    quant) for r in a b; do
             bench bf16-512-$r 60 latency $M $L
             for q in int4 int8 fp8; do
               bench $q-head-512-$r 60 latency $M --quantization $P/$q-with-head.json $L
             done
           done ;;
    diag) step diag-fp8 ${DIAG_S:-120} python3 scripts/diag_decode.py bench/configs/llama-3.1-8b \
            /tmp/t.json bench/configs/quant-policies/fp8-with-head.json \
            --env-ab TANDEM_NORM_CHAIN=0,1 --json "$OUT/diag-fp8.json"
          grep -A14 "^== TANDEM" "$OUT/diag-fp8.log" | cut -c1-110 ;;
  esac
done
