#!/usr/bin/env bash
# The decode GEMVs' L2 prefetch ahead of the PDL wait (kernels/triton/pdl.py) on one H200,
# Llama-3.1-8B shapes, dummy weights. Usage: OUT=dir [METHODS="bf16 int8 int4 fp8"]
#   bash bench/run_l2_prefetch_h200.sh [tests] [diag]
# tests: the GEMV kernels' parity tests on CUDA (the prefetch runs in them: PDL is on);
# diag:  scripts/diag_decode.py --env-ab TANDEM_L2_PREFETCH=1,0 --rounds 2 per method: the
#        batch-1 graph captured under each setting in one process, replay time and whole
#        generate ms/token, alternating.
. "$(dirname "$0")/common.sh"
for what in "$@"; do
  case $what in
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_triton_gemv.py \
             tests/kernels/test_triton_quant.py tests/unit/test_l2_prefetch.py > "$OUT/tests.log" 2>&1
           echo "== tests rc=$?"; tail -3 "$OUT/tests.log" ;;
    diag) for m in ${METHODS:-bf16 int8 int4 fp8}; do
            q=$([ "$m" = bf16 ] && echo "" || echo "$m")
            timeout 240 python3 scripts/diag_decode.py bench/configs/llama-3.1-8b \
              /tmp/trace-$m.json $q --env-ab TANDEM_L2_PREFETCH=1,0 --rounds 2 \
              --json "$OUT/diag-$m.json" > "$OUT/diag-$m.log" 2>&1
            echo "== diag $m rc=$?"; grep "^== " "$OUT/diag-$m.log"
          done ;;
  esac
done
