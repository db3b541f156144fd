#!/usr/bin/env bash
# One H200 (twenty-fourth session, issue 16). Steps, all inside DEADLINE seconds:
#   figures   issue 16's three GPU figures at this tree, Llama-3.1-8B shapes, bf16, dummy
#             weights, one `tandem bench` each: batch-1 decode (128 in / 256 out),
#             offline throughput (1024 x 512/256) and the 8k prefill
#   tests     the CUDA tests (tests/kernels, tests/gpu); the served cases need the server
#             wheels (.whl/site.tar.xz, unpacked on PYTHONPATH)
# Usage: OUT=dir DEADLINE=570 bash bench/run_twentyfourth_h200.sh [figures tests]
. "$(dirname "$0")/common.sh"
[ $# -gt 0 ] || set -- figures tests
for what in "$@"; do
  case $what in
    figures)
      bench latency-bf16 ${LAT_S:-100} latency $M --batch-size 1 --input-len 128 \
        --output-len 256 --max-model-len 1024 --max-num-seqs 1 --iters 3 --no-progress
      bench throughput-bf16 ${TP_S:-150} throughput $M --num-prompts 1024 --input-len 512 \
        --output-len 256 --max-model-len 1024 --max-num-seqs 512 --no-progress
      bench prefill-8k ${PF_S:-90} prefill $M --input-len 8192 --max-num-batched-tokens 8192 \
        --max-model-len 8448 --max-num-seqs 1 --iters 3 --no-progress ;;
    tests)
      step gpu-tests ${TESTS_S:-300} python3 -m pytest -q -rfs --tb=short -p no:cacheprovider \
        tests/kernels tests/gpu
      tail -3 "$OUT/gpu-tests.log"; grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | head -12 | cut -c1-200 ;;
  esac
done
