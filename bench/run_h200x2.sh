#!/usr/bin/env bash
# Issues 17 and 18 on a lent nvidia-h200-x2 (two H200s on NVLink), dummy weights. NVLink
# multicast stays off in every process. Each JSON record (the last stdout line of a command)
# goes to $OUT/<name>.json, the output to $OUT/<name>.log.
# Usage: OUT=dir bash bench/run_h200x2.sh [tp-tests allreduce 8b 70b-latency 70b-throughput
#                                          qwen-latency qwen-throughput dispatch]
. "$(dirname "$0")/common.sh"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
B="--model bench/configs/llama-3.1-70b --load-format dummy"
Q="--model bench/configs/qwen3-30b-a3b --load-format dummy"
L="--batch-size 1 --input-len 128 --output-len 256 --max-model-len 1024 --max-num-seqs 1
   --iters 3 --no-progress"
T="--num-prompts 1024 --input-len 512 --output-len 256 --max-model-len 1024 --max-num-seqs 512
   --no-progress"
for what in "$@"; do
  case $what in
    tp-tests) timeout 300 python3 -m pytest -q tests/kernels/test_custom_all_reduce.py \
                tests/gpu/test_tensor_parallel_cuda.py > "$OUT/tp-tests.log" 2>&1
              echo "== tp-tests rc=$?"; tail -3 "$OUT/tp-tests.log" ;;
    allreduce) timeout 200 python3 -m tandem.bench.all_reduce --world-size 2 --min-bytes 8192 \
                 --max-bytes 2097152 > "$OUT/allreduce.log" 2>&1
               echo "== allreduce rc=$?"; grep -v '^{' "$OUT/allreduce.log" | tail -12
               tail -1 "$OUT/allreduce.log" | grep '^{' > "$OUT/allreduce.json" ;;
    8b) run llama-8b-tp1-latency 200 latency $M $L
        run llama-8b-tp2-latency 200 latency $M $L --tensor-parallel-size 2 ;;
    70b-latency) run llama-70b-tp2-latency 300 latency $B $L --tensor-parallel-size 2 ;;
    70b-throughput) run llama-70b-tp2-throughput 420 throughput $B $T --tensor-parallel-size 2 ;;
    qwen-latency) run qwen3-30b-a3b-tp1-latency 200 latency $Q $L
                  run qwen3-30b-a3b-tp2-latency 200 latency $Q $L --tensor-parallel-size 2
                  run qwen3-30b-a3b-ep2-latency 200 latency $Q $L --tensor-parallel-size 2 \
                    --enable-expert-parallel ;;
    qwen-throughput) run qwen3-30b-a3b-tp1-throughput 240 throughput $Q $T
                     run qwen3-30b-a3b-tp2-throughput 240 throughput $Q $T \
                       --tensor-parallel-size 2
                     run qwen3-30b-a3b-ep2-throughput 240 throughput $Q $T \
                       --tensor-parallel-size 2 --enable-expert-parallel ;;
    dispatch) timeout 200 python3 scripts/bench_ep_dispatch.py --ranks 2 \
                > "$OUT/ep-dispatch.log" 2>&1
              echo "== dispatch rc=$?"; grep -v '^{' "$OUT/ep-dispatch.log" | tail -12
              tail -1 "$OUT/ep-dispatch.log" | grep '^{' > "$OUT/ep-dispatch.json" ;;
  esac
done
