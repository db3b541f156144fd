#!/usr/bin/env bash
# One H200 (twenty-first session, issue 12): FP8 decode attention reading V as 16-bit words
# (two P @ V dots, even and odd dims) against the kernel before, which gathered V a byte at
# a time. Steps, all inside DEADLINE seconds:
#   old      the previous kernel ($OLD_DECODE: 58a80c2's decode.py, copied in untracked as
#            bench/ab/decode_old.py in the session's call; in for this step only): FP8 cases
#   decode   the new kernel: FP8 cases over $FP8_CONFIGS
#   kv       256 x 4096 in / 256 out: FP8 KV with the FP8 tiles fastest summed over batches
#            64-256 x 4096 in the decode step (TANDEM_DECODE_TILES), then bf16 KV
#   kvdef    the same pair again, FP8 KV with the default tiles
#   tests    the attention and fused decode-rotary GPU tests
# The bf16 kernel is unchanged (its branch of the code is the same), so bf16 decode is not
# timed again. Needs no server wheels. Usage:
#   OUT=dir DEADLINE=570 bash bench/run_twentyfirst_h200.sh [old decode kv kvdef tests]
. "$(dirname "$0")/common.sh"
K="--num-prompts 256 --input-len 4096 --output-len 256 --max-model-len 4352 --max-num-seqs 256
   --no-progress"
D=tandem/kernels/triton/decode.py
FP8_CONFIGS=${FP8_CONFIGS:-"[None, (128, 4, 3, 128), (64, 4, 2, 64), (64, 4, 3, 64)]"}
[ $# -gt 0 ] || set -- old decode kv tests
for what in "$@"; do
  case $what in
    old) cp $D /tmp/decode_new.py && cp "${OLD_DECODE:-bench/ab/decode_old.py}" $D
         step old-fp8 ${OLD_S:-70} python3 scripts/bench_decode_attention.py --case fp8 \
           --configs "[None, (128, 4, 3, 128)]" --json "$OUT/old-fp8.json"
         cp /tmp/decode_new.py $D
         grep -E "^llama|^  " "$OUT/old-fp8.log" | cut -c1-90 ;;
    decode) step decode-fp8 ${DECODE_S:-110} python3 scripts/bench_decode_attention.py \
              --case fp8 --configs "$FP8_CONFIGS" --json "$OUT/decode-fp8.json"
            grep -E "^llama|^  " "$OUT/decode-fp8.log" | cut -c1-90 ;;
    kv) best=$(python3 scripts/best_decode_tiles.py "$OUT/decode-fp8.json")
        echo "FP8 tiles for kv: '${best}'"
        TANDEM_DECODE_TILES=$best bench kv-fp8 ${KV_S:-130} throughput $M --kv-cache-dtype fp8 $K
        bench kv-auto ${KV_S:-130} throughput $M --kv-cache-dtype auto $K ;;
    kvdef) bench kv-fp8-default ${KV_S:-130} throughput $M --kv-cache-dtype fp8 $K
           bench kv-auto-2 ${KV_S:-130} throughput $M --kv-cache-dtype auto $K ;;
    tests) step gpu-tests ${TESTS_S:-120} python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
             tests/kernels/test_triton_attention.py tests/kernels/test_triton_decode_rotary.py \
             -k "${TESTS_K:-not nothing}"
           tail -2 "$OUT/gpu-tests.log"; grep -E "^FAILED" "$OUT/gpu-tests.log" | head -8 | cut -c1-200 ;;
  esac
done
