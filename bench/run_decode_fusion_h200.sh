#!/usr/bin/env bash
# Issue 16's run on one H200: the fused decode kernels' GPU tests, batch-1 decode latency
# (Llama-3.1-8B shapes, dummy bf16 weights, 128 in / 256 out) with the fusions on and off,
# the per-kernel breakdown of both (scripts/diag_decode.py --ab), then the GPU tests around
# them, all inside DEADLINE seconds (each step gets what is left). Outputs under $OUT.
# Usage: OUT=dir DEADLINE=280 bash bench/run_decode_fusion_h200.sh
. "$(dirname "$0")/common.sh"
start=$(date +%s)
left() { echo $(( ${DEADLINE:-280} - ($(date +%s) - start) )); }
step() {  # name, most seconds, command...
  local name=$1 most=$2; shift 2
  local t; t=$(left); [ "$t" -gt "$most" ] && t=$most
  [ "$t" -le 5 ] && { echo "== $name skipped (no time left)"; return; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? at $(( $(date +%s) - start ))s"
}
LAT="$M --batch-size 1 --input-len 128 --output-len 256 --max-model-len 1024 --max-num-seqs 1 --iters 3 --no-progress"
step kernel-tests 70 python3 -m pytest -q -m gpu tests/kernels/test_triton_norm_gemv.py
tail -2 "$OUT/kernel-tests.log"; grep -E "^(FAILED|E  )" "$OUT/kernel-tests.log" | head -8 | cut -c1-200
for f in 1 0; do
  TANDEM_DECODE_FUSION=$f step latency-fusion$f 60 python3 -m tandem bench latency $LAT
  tail -6 "$OUT/latency-fusion$f.log" | grep -v '^{'
  tail -1 "$OUT/latency-fusion$f.log" | grep '^{' > "$OUT/latency-fusion$f.json" || rm -f "$OUT/latency-fusion$f.json"
done
step diag-ab 80 python3 scripts/diag_decode.py bench/configs/llama-3.1-8b /tmp/trace.json --ab \
  --json "$OUT/diag-ab.json"
grep -A12 "^== " "$OUT/diag-ab.log" | cut -c1-80
step gpu-tests 120 python3 -m pytest -q -m gpu tests/gpu/test_engine_cuda.py \
  tests/kernels/test_triton_gemv.py tests/kernels/test_triton_elementwise.py \
  tests/unit/test_models.py tests/kernels/test_triton_attention.py
tail -2 "$OUT/gpu-tests.log"; grep -E "^FAILED" "$OUT/gpu-tests.log" | head -5
