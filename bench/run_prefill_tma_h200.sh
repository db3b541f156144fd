#!/usr/bin/env bash
# One H200: what the fifteenth session left for a GPU. The TMA prefill path's tests with the
# isolation fix (TANDEM_PREFILL_TMA=1, opt-in until they pass), the 8k prefill with it on
# and off in one call, and how the matmul rate behind every roofline_fraction moves with
# the clock and power limit (scripts/diag_matmul_clock.py). All inside DEADLINE seconds.
# Outputs under $OUT. Carry the server wheels as .whl/site.tar.xz (see its README), then:
#   mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
# Usage: OUT=dir DEADLINE=560 bash bench/run_prefill_tma_h200.sh [tests clock prefill]
. "$(dirname "$0")/common.sh"
P="--input-len 8192 --max-num-batched-tokens 8192 --max-model-len 8448 --max-num-seqs 1 --iters 3 --no-progress"
[ $# -gt 0 ] || set -- tests clock prefill
for what in "$@"; do
  case $what in
    tests) TANDEM_PREFILL_TMA=1 step tma-tests ${TESTS_S:-200} python3 -m pytest -q -rf \
             --tb=short -p no:cacheprovider tests/kernels/test_triton_attention.py \
             tests/gpu/test_engine_cuda.py
           tail -2 "$OUT/tma-tests.log"; grep -E "^FAILED" "$OUT/tma-tests.log" | head -8 | cut -c1-200 ;;
    clock) step matmul-clock 60 python3 scripts/diag_matmul_clock.py --json "$OUT/matmul-clock.json"
           grep -v '^{' "$OUT/matmul-clock.log" ;;
    prefill) TANDEM_PREFILL_TMA=1 bench prefill-tma 80 prefill $M $P
             TANDEM_PREFILL_TMA=0 bench prefill-ptr 80 prefill $M $P ;;
  esac
done
