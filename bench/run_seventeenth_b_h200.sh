#!/usr/bin/env bash
# One H200 (seventeenth session, second call): the decode kernel's one variant for any
# partition count (no compile inside a long run's measurement), the FP8-KV long-context
# pair and the quantized kernels' GPU tests. Usage: OUT=dir DEADLINE=420 bash bench/run_seventeenth_b_h200.sh
. "$(dirname "$0")/common.sh"
step attn-tests 60 python3 -m pytest -q -x -rf tests/kernels/test_triton_attention.py -k "decode"
tail -2 "$OUT/attn-tests.log"
K="--num-prompts 256 --input-len 4096 --output-len 256 --max-model-len 4352 --max-num-seqs 256 --no-progress"
for kv in fp8 auto; do
  step one-time-$kv 125 python3 scripts/diag_one_time.py $M --kv-cache-dtype $kv $K
  grep -E "^start-up|^bench|^again|compiled:" "$OUT/one-time-$kv.log" | cut -c1-400
done
step quant-tests 110 python3 -m pytest -q -rf tests/kernels/test_triton_quant.py
tail -2 "$OUT/quant-tests.log"; grep -E "^FAILED" "$OUT/quant-tests.log" | head -5 | cut -c1-200
