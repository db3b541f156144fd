#!/usr/bin/env bash
# One H200 (nineteenth session, issue 12): an FP8 cache's blocks hold V transposed, so the
# decode and prefill kernels read the P V operand 16 keys at a time (one byte a key before).
# That layout was measured (trees 268c7aa and 155f032..68fc81a) and reverted; the `write`
# step's scripts/bench_kv_write.py went with it. See bench/results/2026-12-03-h200-nineteenth-*.
# Steps, all inside DEADLINE seconds:
#   tests    the attention, fused decode-rotary and rotary-write GPU tests
#   decode   decode attention alone (scripts/bench_decode_attention.py): FP8 cases over a few
#            tiles, and bf16 at batch 256 x 4096
#   prefill  the FP8 prefill kernel (scripts/bench_prefill_fp8.py)
#   kv       256 x 4096 in / 256 out, FP8 KV then bf16 KV (`tandem bench throughput`)
# Outputs under $OUT. Carry the server wheels as .whl/site.tar.xz, then:
#   mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
# Usage: OUT=dir DEADLINE=570 bash bench/run_nineteenth_h200.sh [tests decode prefill kv]
. "$(dirname "$0")/common.sh"
K="--num-prompts 256 --input-len 4096 --output-len 256 --max-model-len 4352 --max-num-seqs 256
   --no-progress"
[ $# -gt 0 ] || set -- tests decode prefill kv
for what in "$@"; do
  case $what in
    tests) step gpu-tests ${TESTS_S:-150} python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
             tests/kernels/test_triton_attention.py tests/kernels/test_triton_decode_rotary.py \
             tests/kernels/test_triton_rotary_write_kv.py -k "${TESTS_K:-not nothing}"
           tail -2 "$OUT/gpu-tests.log"; grep -E "^FAILED" "$OUT/gpu-tests.log" | head -8 | cut -c1-200 ;;
    decode) step decode-fp8 ${DECODE_S:-120} python3 scripts/bench_decode_attention.py --case fp8 \
              --configs "${DECODE_CONFIGS:-[None, (128, 8, 2, 128), (128, 4, 3, 128), (64, 4, 2, 64), (256, 8, 2, 256)]}" \
              --json "$OUT/decode-fp8.json"
            grep -E "^llama|^  " "$OUT/decode-fp8.log" | cut -c1-90
            step decode-bf16 60 python3 scripts/bench_decode_attention.py --case b256-ctx4096-bf16 \
              --configs "[None]" --json "$OUT/decode-bf16.json"
            grep -E "^llama|^  " "$OUT/decode-bf16.log" | cut -c1-90 ;;
    prefill) step prefill-fp8 ${PREFILL_S:-150} python3 scripts/bench_prefill_fp8.py --json "$OUT/prefill-fp8.json"
             grep -E "TFLOP|Error" "$OUT/prefill-fp8.log" | cut -c1-120 ;;
    kv) for kv in fp8 auto; do
          bench kv-$kv ${KV_S:-150} throughput $M --kv-cache-dtype $kv $K
        done ;;
  esac
done
