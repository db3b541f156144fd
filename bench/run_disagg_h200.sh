#!/usr/bin/env bash
# Issue 15's runs on one H200: the disaggregation GPU tests, the KV path's bandwidth stage
# by stage (scripts/bench_kv_transfer.py, Llama-3.1-8B shapes), and a served 1P1D pair
# sharing the GPU (Llama-3.1-8B shapes, dummy weights, 4096-token prompts) through each
# connector, timed by its own /metrics (scripts/bench_disagg_serve.py). On two GPUs: p2p
# (scripts/bench_kv_p2p.py, NCCL between the GPUs against a plain copy) and serve-nccl. Usage: OUT=dir bash bench/run_disagg_h200.sh [tests bw serve]
set -u
OUT=${OUT:-bench/results/tmp}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -f .bench_commit ] && export TANDEM_GIT_COMMIT=${TANDEM_GIT_COMMIT:-$(cat .bench_commit)}
[ $# -gt 0 ] || set -- tests bw serve
for what in "$@"; do
  case $what in
    tests) timeout 400 python3 -m pytest -q -s -m gpu tests/gpu/test_disagg_cuda.py \
             > "$OUT/gpu-tests.log" 2>&1; echo "== tests rc=$?"; tail -4 "$OUT/gpu-tests.log" ;;
    bw) timeout 300 python3 scripts/bench_kv_transfer.py --tokens 512,2048,8192 \
          > "$OUT/kv-transfer.log" 2>&1; echo "== bw rc=$?"
        grep -v '^{' "$OUT/kv-transfer.log" | tail -6
        tail -1 "$OUT/kv-transfer.log" | grep '^{' > "$OUT/kv-transfer.json" ;;
    serve) M=/tmp/llama-3.1-8b
           python3 -m tandem.bench.shape_tokenizer bench/configs/llama-3.1-8b $M > /dev/null
           timeout 400 python3 scripts/bench_disagg_serve.py $M --connectors ipc,shm \
             --prompt-len 4096 --num-prompts 6 --log-dir "$OUT" --serve-args \
             "--load-format dummy --gpu-memory-utilization 0.42 --max-model-len 8448" \
             > "$OUT/disagg-serve.log" 2>&1; echo "== serve rc=$?"
           grep -v '^{' "$OUT/disagg-serve.log" | tail -5
           tail -1 "$OUT/disagg-serve.log" | grep '^{' > "$OUT/disagg-serve.json" ;;
    p2p) timeout 300 python3 scripts/bench_kv_p2p.py --tokens 512,2048,8192 \
           > "$OUT/kv-p2p.log" 2>&1; echo "== p2p rc=$?"
         grep -v '^{' "$OUT/kv-p2p.log" | tail -5
         tail -1 "$OUT/kv-p2p.log" | grep '^{' > "$OUT/kv-p2p.json" ;;
    serve-nccl) M=/tmp/llama-3.1-8b
           python3 -m tandem.bench.shape_tokenizer bench/configs/llama-3.1-8b $M > /dev/null
           timeout 300 python3 scripts/bench_disagg_serve.py $M --connectors nccl \
             --prompt-len 4096 --num-prompts 6 --log-dir "$OUT" --serve-args \
             "--load-format dummy --max-model-len 8448" \
             > "$OUT/disagg-serve-nccl.log" 2>&1; echo "== serve-nccl rc=$?"
           grep -v '^{' "$OUT/disagg-serve-nccl.log" | tail -4
           tail -1 "$OUT/disagg-serve-nccl.log" | grep '^{' > "$OUT/disagg-serve-nccl.json" ;;
  esac
done
