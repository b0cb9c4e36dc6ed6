#!/usr/bin/env bash
# xlaserve's all-reduce kernel (sharding/all_reduce.py, session 9) on 2+ GPUs of one host, one call:
#   1. the kernel against jax.lax.psum (tests/sharding/test_all_reduce.py, compiled on the GPUs)
#   2. bench/all_reduce.py: one all-reduce's latency, kernel vs XLA's collective (NCCL)
#   3. bench/tp_scaling.py, 8B shape, decode B=1 (+ prefill 2048), tp $TP with the kernel
#      (--all-reduce custom; a watchdog prints native stacks of a child that stalls), then tp 2
#      with XLA's collective (--all-reduce xla) for the ratio in the same run
#   4. the builtin model through the CLI at tp 2 (kernel) vs tp 1: same greedy tokens?
#   OUT=/tmp/out bash bench/run_gpu_allreduce.sh      (TRACE=1: --trace-dir for step 3;
#   MICRO=0 skips step 2, XLA_RUN=0 the tp 2 run with XLA's collective, NO_PREFILL=1 the
#   prefill timing; TRACE_TP2=1 adds a traced tp 2 decode run after step 3's untraced one;
#   UNFUSED=1 a tp 2 run without the fused residual add + RMSNorm)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0
R=${OUT:?set OUT}/allreduce
PY=${PYTHON:-python3}
TP=${TP:-1 2}
source bench/gpu_install.sh && gpu_session "$R" session.log "all-reduce kernel; tp $TP" \
  && gpu_install || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
T0=$SECONDS
watch_stall() {  # PID SECONDS FILE: native stacks of PID and its children if still running
  sleep "$2"; kill -0 "$1" 2>/dev/null || return
  for c in $(pgrep -P "$1") $1; do
    echo "--- stalled pid $c: $(tr '\0' ' ' < /proc/$c/cmdline | head -c 200)"
    if command -v gdb >/dev/null; then timeout 60 gdb -p "$c" -batch -ex "thread apply all bt 12" 2>&1 | grep -E "^#|^Thread" | head -150
    else for t in /proc/$c/task/*; do echo "$t $(cat $t/wchan 2>/dev/null) $(cat $t/comm)"; done | head -80; fi
  done > "$3" 2>&1
}
JAX_PLATFORMS=cuda timeout -k 5 "${TEST_S:-200}" $PY -m pytest -q -rfs --tb=short \
  -p no:cacheprovider tests/sharding/test_all_reduce.py > "$R/pytest_all_reduce.txt" 2>&1
echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -3 "$R/pytest_all_reduce.txt"
if [ "${MICRO:-1}" != 0 ]; then
timeout -s ABRT -k 5 150 $PY bench/all_reduce.py --tp 2 --tokens 1 16 128 \
  --out "$R/all_reduce_micro.json" > "$R/all_reduce_micro.log" 2>&1
echo "=== micro rc=$? at $((SECONDS - T0))s"; tail -3 "$R/all_reduce_micro.log"
fi
timeout -s ABRT -k 5 "${BENCH_S:-300}" $PY bench/tp_scaling.py --tp $TP --decode-batches 1 \
  --all-reduce custom --child-timeout 200 ${TRACE:+--trace-dir /tmp/tp_trace} \
  ${NO_PREFILL:+--no-prefill} \
  --out "$R/tp_custom.json" > "$R/tp_custom.log" 2>&1 &
P=$!; watch_stall $P 250 "$R/stall.txt" & W=$!; wait $P
echo "=== tp_scaling custom rc=$? at $((SECONDS - T0))s"; kill $W 2>/dev/null
grep -E "decode B=1|busy|command_buffer" "$R/tp_custom.log" | head -12
if [ -n "${TRACE_TP2:-}" ]; then
timeout -s ABRT -k 5 200 $PY bench/tp_scaling.py --tp 2 --decode-batches 1 --all-reduce custom \
  --no-prefill --greedy-steps 2 --trace-dir /tmp/tp_trace2 --out "$R/tp2_trace.json" \
  > "$R/tp2_trace.log" 2>&1
echo "=== tp2 traced rc=$? at $((SECONDS - T0))s"; grep -E "busy|xlaserve_all_reduce|gemm_fusion" "$R/tp2_trace.log" | head -12
fi
if [ -n "${UNFUSED:-}" ]; then  # A/B: the kernel without the fused add + RMSNorm
timeout -s ABRT -k 5 200 $PY bench/tp_scaling.py --tp 2 --decode-batches 1 --all-reduce custom \
  --no-fused-norm --no-prefill --greedy-steps 2 --out "$R/tp_unfused.json" > "$R/tp_unfused.log" 2>&1
echo "=== tp_scaling unfused rc=$? at $((SECONDS - T0))s"; grep "decode B=1" "$R/tp_unfused.log"
fi
if [ "${XLA_RUN:-1}" != 0 ]; then
timeout -s ABRT -k 5 200 $PY bench/tp_scaling.py --tp 2 --decode-batches 1 --all-reduce xla \
  --no-prefill --child-timeout 180 --out "$R/tp_xla.json" > "$R/tp_xla.log" 2>&1
echo "=== tp_scaling xla rc=$? at $((SECONDS - T0))s"; grep "decode B=1" "$R/tp_xla.log"
fi
gpu_cli_tp_check "$R"
$PY - "$R" <<'PY' | tee "$R/summary.txt"
import json, sys
for n in ("tp_custom", "tp_unfused", "tp_xla"):
    try:
        rep = json.load(open(f"{sys.argv[1]}/{n}.json"))
    except Exception as e:
        print(n, "missing:", e); continue
    for r in rep["results"]:
        print(f"{n} tp={r['tp']}: decode B=1 {r['decode']['1']['step_ms']} ms, prefill "
              f"{r.get('prefill', {}).get('step_ms')} ms ({r.get('row_parallel')})")
    print(n, "checks:", json.dumps(rep.get("checks")))
PY
