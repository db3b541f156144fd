#!/usr/bin/env bash
# One H200 (twenty-third session, issue 16's 8k prefill). Steps, inside DEADLINE seconds:
#   timeline  scripts/diag_prefill_timeline.py: the 8k prompt's host time before and after
#             its kernels and the GPU gaps between them, with the engine's phases marked
#   gemms     scripts/bench_prefill_gemms.py: the prefill's linears, weight layouts, the
#             residual add in the GEMM epilogue, cuBLASLt
#   prefill   `tandem bench prefill`, 8192 tokens (issue 16's figure), 5 runs
# Needs no server wheels. Usage:
#   OUT=dir DEADLINE=570 bash bench/run_twentythird_h200.sh [timeline gemms prefill]
. "$(dirname "$0")/common.sh"
[ $# -gt 0 ] || set -- timeline gemms prefill
for what in "$@"; do
  case $what in
    timeline) step timeline ${TL_S:-120} python3 scripts/diag_prefill_timeline.py \
                bench/configs/llama-3.1-8b --input-len 8192 --runs 5
              grep -v "Warning\|warn" "$OUT/timeline.log" | tail -40 ;;
    gemms) step gemms ${GEMM_S:-120} python3 scripts/bench_prefill_gemms.py --rounds 5
           grep -v '^{' "$OUT/gemms.log" | tail -8 ;;
    prefill) bench prefill-8k ${PF_S:-90} prefill $M --input-len 8192 \
               --max-num-batched-tokens 8192 --max-model-len 8448 --max-num-seqs 1 \
               --iters 5 --no-progress ;;
  esac
done
