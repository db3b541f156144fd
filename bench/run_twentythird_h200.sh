#!/usr/bin/env bash
# One H200 (twenty-third session, issue 16's 8k prefill). Steps, inside DEADLINE seconds:
#   timeline  scripts/diag_prefill_timeline.py: the 8k prompt's host time before and after
#             its kernels and the GPU gaps between them, with the engine's phases marked
#   gemms     scripts/bench_prefill_gemms.py: the prefill's linears, weight layouts, the
#             residual add in the GEMM epilogue, cuBLASLt
#   tiles     scripts/bench_prefill_tma.py over tile configs ($TILES), pointer and TMA loads
#   wsprobe   scripts/probe_triton_ws.py: does Triton's Hopper warp specialization run a
#             minimal attention loop, or hang (the engine's variant, at 0f53b66, hung)
#   views     the default tiles with Q, K, V as views of one fused QKV output (the model's)
#   tp512 tp1024 tp1024fp8  issue 16's throughput (1024 x 512/256) at max_num_seqs 512 or
#             1024 (all prompts in one wave), the last with an FP8 KV cache
#   prefill   `tandem bench prefill`, 8192 tokens (issue 16's figure), 5 runs
# Needs no server wheels. Usage:
#   OUT=dir DEADLINE=570 bash bench/run_twentythird_h200.sh [timeline gemms prefill]
. "$(dirname "$0")/common.sh"
[ $# -gt 0 ] || set -- timeline gemms prefill
for what in "$@"; do
  case $what in
    timeline) step timeline ${TL_S:-120} python3 scripts/diag_prefill_timeline.py \
                bench/configs/llama-3.1-8b --input-len 8192 --runs 5 --events 5
              grep -v "Warning\|warn" "$OUT/timeline.log" | grep -v "^ *[0-9]* *0.000 *0.000" | head -75 | cut -c1-160 ;;
    gemms) step gemms ${GEMM_S:-120} python3 scripts/bench_prefill_gemms.py --rounds 5
           grep -v '^{' "$OUT/gemms.log" | tail -8 ;;
    tiles) step tiles ${TILES_S:-150} python3 scripts/bench_prefill_tma.py \
             --json "$OUT/tiles.json" --configs "${TILES:-default;64,64,4,2;64,64,4,3;128,64,8,2;64,128,4,2;128,64,4,2}"
           grep -v '^{' "$OUT/tiles.log" | tail -30 ;;
    wsprobe) step ws-probe ${PROBE_S:-100} python3 scripts/probe_triton_ws.py --timeout ${PROBE_TIMEOUT:-40}
             grep -v '^{"bench' "$OUT/ws-probe.log" | tail -3 ;;
    views) step views ${TILES_S:-90} python3 scripts/bench_prefill_tma.py --qkv-views \
             --json "$OUT/views.json" --configs default
           grep -v '^{' "$OUT/views.log" | tail -8 ;;
    tp512|tp1024|tp1024fp8) n=${what#tp}; n=${n%fp8}; kv=auto; case $what in *fp8) kv=fp8 ;; esac
           bench throughput-$what ${TP_S:-150} throughput $M --num-prompts 1024 \
             --input-len 512 --output-len 256 --max-model-len 1024 --max-num-seqs $n \
             --kv-cache-dtype $kv --no-progress ;;
    prefill) bench prefill-8k ${PF_S:-90} prefill $M --input-len 8192 \
               --max-num-batched-tokens 8192 --max-model-len 8448 --max-num-seqs 1 \
               --iters 5 --no-progress ;;
  esac
done
