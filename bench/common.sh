# Sourced by the bench/run_*_h200.sh scripts: $OUT, the commit, the Llama-3.1-8B dummy
# model flags ($M), and run NAME TIMEOUT ARGS... (`tandem bench ARGS`: the output to
# $OUT/NAME.log, its JSON record, the last stdout line, to $OUT/NAME.json). Under a
# deadline (DEADLINE seconds from sourcing, default 560): step NAME MOST CMD... runs CMD
# for at most MOST seconds or what is left, and bench NAME MOST ARGS... does `run` so.
set -u
OUT=${OUT:-bench/results/tmp}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
[ -f .bench_commit ] && export TANDEM_GIT_COMMIT=${TANDEM_GIT_COMMIT:-$(cat .bench_commit)}
M="--model bench/configs/llama-3.1-8b --load-format dummy"
run() {  # name, timeout, args...
  local name=$1 t=$2; shift 2
  timeout "$t" python3 -m tandem bench "$@" > "$OUT/$name.log" 2>&1
  echo "== $name rc=$?"; tail -9 "$OUT/$name.log" | grep -v '^{'
  tail -1 "$OUT/$name.log" | grep '^{' > "$OUT/$name.json" || rm -f "$OUT/$name.json"
}
start=$(date +%s)
left() { echo $(( ${DEADLINE:-560} - ($(date +%s) - start) )); }
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
