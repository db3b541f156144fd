#!/usr/bin/env bash
# Issue 19 on a lent nvidia-h200-x2: prefill/decode disaggregation against colocated
# replicas, Llama-3.1-8B shapes (dummy weights, the word-level shape tokenizer), Poisson
# arrivals of a mixed workload (80% 256-token and 20% 8,192-token prompts, 256 output tokens,
# EOS ignored), at each rate in $RATES. NVLink multicast stays off in every process.
#   colocated   two replicas, one per GPU, behind the front end (--decode-workers 2)
#   disagg      decode on GPU 0, prefill on GPU 1, KV over NCCL (--prefill-workers 1)
#               under the conditional rule, and under `always`
# Then the KV path's bandwidth between the GPUs (scripts/bench_kv_p2p.py).
# `tandem bench serve` needs aiohttp (and multidict, yarl, propcache, frozenlist, aiosignal,
# aiohappyeyeballs, attrs): carry its wheels too; if the tree grows past the device's 64 MiB,
# install them on the warm machine in an earlier call (/tmp/site outlives the call).
# Usage: OUT=dir [RATES="4 8 12"] [N=240] bash bench/run_disagg_h200x2.sh \
#          [colocated conditional always p2p]
set -u
OUT=${OUT:-bench/results/tmp}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
       NVSHMEM_DISABLE_NVLS=1
[ -f .bench_commit ] && export TANDEM_GIT_COMMIT=${TANDEM_GIT_COMMIT:-$(cat .bench_commit)}
M=/tmp/llama-3.1-8b
python3 -m tandem.bench.shape_tokenizer bench/configs/llama-3.1-8b $M > /dev/null
E="--load-format dummy --max-model-len 8704 --max-num-seqs 256"
W="--dataset mixed --mix 0.8:256,0.2:8192 --random-output-len 256 --ignore-eos
   --goodput ttft:2000 tpot:40 --num-prompts ${N:-240} --no-progress"
serve() {  # name, serve flags
  local name=$1; shift
  python3 - "$M" "$E $*" "$OUT" "$name" "${RATES:-4 8 12}" "$W" <<'PY'
import shlex, subprocess, sys
from tandem.bench.serve_cli import start_server, stop_server
model, serve_args, out, name, rates, work = sys.argv[1:]
proc, url = start_server(model, serve_args, f"{out}/{name}.server.log")
try:
    for rate in rates.split():
        log = f"{out}/{name}-rate{rate}.log"
        with open(log, "w") as f:
            subprocess.run([sys.executable, "-m", "tandem", "bench", "serve", "--base-url", url,
                            "--model", model, "--request-rate", rate, *shlex.split(work)],
                           stdout=f, stderr=subprocess.STDOUT, timeout=400)
        print(f"== {name} rate {rate}"); print("".join(open(log).readlines()[-14:-1]))
finally:
    stop_server(proc)
PY
}
for what in "$@"; do
  case $what in
    colocated) serve colocated --decode-workers 2 ;;
    conditional) serve disagg-conditional --prefill-workers 1 --disagg-policy conditional ;;
    always) serve disagg-always --prefill-workers 1 --disagg-policy always ;;
    p2p) timeout 300 python3 scripts/bench_kv_p2p.py --tokens 512,2048,8192 \
           > "$OUT/kv-p2p.log" 2>&1; echo "== p2p rc=$?"; grep -v '^{' "$OUT/kv-p2p.log" | tail -5
         tail -1 "$OUT/kv-p2p.log" | grep '^{' > "$OUT/kv-p2p.json" ;;
  esac
done
