#!/usr/bin/env bash
# Session 22 (issue 6): where the tp=2 decode step's device idle time lies.
#   probe: tp=1 and tp=2 (the library) with the steady-state slope (--slope-iters) beside the
#     usual 20-step runs; traced runs (6 steps) whose summaries list the idle time between each
#     pair of kernels; the replicated input embedding (sessions 13/15: 80-125 us slower, never
#     traced) traced too.
#   OUT=/tmp/out PART=probe bash bench/run_gpu_s22.sh  (2 GPUs; carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 22 probe || exit 1
summary() {  # the traced run's per-step trace summary (bench/trace_summary.render)
  $PY - "$1" <<'PY'
import json, sys
sys.path.insert(0, "bench")
import trace_summary
for r in json.load(open(sys.argv[1]))["results"]:
    if r["decode"]["1"].get("trace"):
        print("tp", r["tp"], trace_summary.render(r["decode"]["1"]["trace"], top=16))
PY
}
for r in ${RUNS:-base2 base1 base2b rep2 base2_t base1_t rep2_t}; do  # base|rep + tp (+ tag)
  tp=${r//[!0-9]/}; tp=${tp:0:1}
  if [ $((SECONDS - T0)) -gt ${STOP_AT:-460} ]; then echo "=== $r skipped (time)"; continue; fi
  extra=(--slope-iters ${SLOPE:-80})
  [ "${r: -2}" = _t ] && extra=(--trace-dir /tmp/tr_$r --trace-steps ${TRACE_STEPS:-6})
  case ${r:0:3} in
    rep) run_tp $r $tp --replicate-embedding "${extra[@]}" ;;
    *) run_tp $r $tp "${extra[@]}" ;;
  esac
  [ "${r: -2}" = _t ] && summary "$R/$r.json"
done
tar czf "$OUT/s22_$PART.tgz" -C "$OUT" "s22_$PART" 2>/dev/null
