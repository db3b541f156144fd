#!/usr/bin/env bash
# One H200 (twentieth session, issue 12): decode attention with the next tile's cache slots
# read a tile ahead, so Triton's pipeliner double-buffers the K/V copies (before, every stage
# count left one buffer and a program's copies waited on its own dots). Steps, all inside
# DEADLINE seconds:
#   old      the previous kernel ($OLD_DECODE: fdb856e's decode.py, copied in untracked as
#            bench/ab/decode_old.py in the session's call; in for this step only):
#            FP8 cases, bf16 at batch 256 x 4096 and the batch-1 cases, default tiles
#   decode   the new kernel over tiles: FP8 cases, bf16 at batch 256 x 4096, batch-1 cases
#   kv       256 x 4096 in / 256 out: FP8 KV with the FP8 tiles that were fastest summed over
#            batches 64-256 x 4096 in the decode step (TANDEM_DECODE_TILES), then bf16 KV
#   kvdef    FP8 KV with the default tiles
#   tests    the attention, fused decode-rotary and rotary-write GPU tests
# Outputs under $OUT. Carry the server wheels as .whl/site.tar.xz, then:
#   mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
# Usage: OUT=dir DEADLINE=540 bash bench/run_twentieth_h200.sh [old decode kv kvdef tests]
. "$(dirname "$0")/common.sh"
K="--num-prompts 256 --input-len 4096 --output-len 256 --max-model-len 4352 --max-num-seqs 256
   --no-progress"
D=tandem/kernels/triton/decode.py
FP8_CONFIGS=${FP8_CONFIGS:-"[None, (128, 4, 3, 128), (128, 8, 3, 128), (64, 4, 3, 64), (64, 4, 3, 128), (64, 4, 4, 128), (32, 4, 4, 128), (32, 4, 5, 128)]"}
BF16_CONFIGS=${BF16_CONFIGS:-"[None, (64, 4, 2, 64), (32, 4, 3, 64), (32, 4, 4, 64), (64, 4, 4, 64)]"}
[ $# -gt 0 ] || set -- old decode kv kvdef tests
for what in "$@"; do
  case $what in
    old) cp $D /tmp/decode_new.py && cp "${OLD_DECODE:-bench/ab/decode_old.py}" $D
         step old-fp8 ${OLD_S:-60} python3 scripts/bench_decode_attention.py --case fp8 \
           --configs "[None]" --json "$OUT/old-fp8.json"
         step old-bf16 40 python3 scripts/bench_decode_attention.py --case ctx4096-bf16 \
           --configs "[None]" --json "$OUT/old-bf16.json"
         step old-b1 40 python3 scripts/bench_decode_attention.py --case b1-ctx \
           --configs "[None]" --json "$OUT/old-b1.json"
         cp /tmp/decode_new.py $D
         grep -E "^llama|^qwen|^  " "$OUT"/old-*.log | cut -c1-100 ;;
    decode) step decode-fp8 ${DECODE_S:-150} python3 scripts/bench_decode_attention.py --case fp8 \
              --configs "$FP8_CONFIGS" --json "$OUT/decode-fp8.json"
            grep -E "^llama|^  " "$OUT/decode-fp8.log" | cut -c1-90
            step decode-bf16 ${DECODE_BF16_S:-90} python3 scripts/bench_decode_attention.py \
              --case ctx4096-bf16 --configs "$BF16_CONFIGS" --json "$OUT/decode-bf16.json"
            step decode-b1 60 python3 scripts/bench_decode_attention.py --case b1-ctx \
              --configs "[None, (64, 4, 2, 64)]" --json "$OUT/decode-b1.json"
            grep -E "^llama|^qwen|^  " "$OUT"/decode-bf16.log "$OUT"/decode-b1.log | cut -c1-100 ;;
    kv) best=$(python3 scripts/best_decode_tiles.py "$OUT/decode-fp8.json")
        echo "FP8 tiles for kv: '${best}'"
        TANDEM_DECODE_TILES=$best bench kv-fp8 ${KV_S:-130} throughput $M --kv-cache-dtype fp8 $K
        bench kv-auto ${KV_S:-130} throughput $M --kv-cache-dtype auto $K ;;
    kvdef) bench kv-fp8-default ${KV_S:-130} throughput $M --kv-cache-dtype fp8 $K ;;
    tests) step gpu-tests ${TESTS_S:-150} python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
             tests/kernels/test_triton_attention.py tests/kernels/test_triton_decode_rotary.py \
             tests/kernels/test_triton_rotary_write_kv.py -k "${TESTS_K:-not nothing}"
           tail -2 "$OUT/gpu-tests.log"; grep -E "^FAILED" "$OUT/gpu-tests.log" | head -8 | cut -c1-200 ;;
  esac
done
