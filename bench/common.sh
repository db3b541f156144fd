# Sourced by the bench/run_*_h200.sh scripts: $OUT, the commit, the Llama-3.1-8B dummy
# model flags ($M), and
#   step NAME MOST CMD...   CMD for at most MOST seconds, or what is left of DEADLINE
#                           (seconds from sourcing; unset: no overall limit), output to
#                           $OUT/NAME.log
#   bench NAME MOST ARGS... (alias run) `tandem bench ARGS` as a step; its JSON record, the
#                           last stdout line, to $OUT/NAME.json
set -u
OUT=${OUT:-bench/results/tmp}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -f .bench_commit ] && export TANDEM_GIT_COMMIT=${TANDEM_GIT_COMMIT:-$(cat .bench_commit)}
M="--model bench/configs/llama-3.1-8b --load-format dummy"
start=$(date +%s)
left() { echo $(( ${DEADLINE:-999999} - ($(date +%s) - start) )); }
step() {  # name, most seconds, command...
  local name=$1 most=$2; shift 2
  local t; t=$(left); [ "$t" -gt "$most" ] && t=$most
  [ "$t" -le 5 ] && { echo "== $name skipped (no time left)"; return; }
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? at $(( $(date +%s) - start ))s"
}
bench() {  # name, most seconds, tandem bench args...
  local name=$1; shift
  step "$name" "$1" python3 -m tandem bench "${@:2}"
  tail -8 "$OUT/$name.log" | grep -v '^{'
  tail -1 "$OUT/$name.log" | grep '^{' > "$OUT/$name.json" || rm -f "$OUT/$name.json"
}
run() { bench "$@"; }
