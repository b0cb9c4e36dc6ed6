#!/usr/bin/env bash
# Session 12 on 2 GPUs: decode-sized projections through the Pallas skinny GEMM
# (pallas_kernels/skinny_gemm.py; q/k/v in one launch, o_proj / down_proj as split-K partials
# into the fused all-reduce) against XLA's GEMMs, A/B in both orders.
#   PART=1: tests/kernels/test_skinny_gemm.py compiled; tests/sharding/test_all_reduce.py on the
#           2 GPUs; bench/tp_scaling.py --tp 1 2 with --decode-gemm xla, then auto
#   PART=2: tp 2 auto then xla again (the other order), auto traced; then bench/gemm_decode.py
#           sweeping the kernel's tiles (new table in $R/skinny_gemm_tuning.json)
#   PART=4: the GPU tests and --decode-gemm auto at tp 1 and 2 (the final table)
#   PART=3: the sweep's table (NEW=path) against the committed one and XLA's GEMMs, tp 1 and 2,
#           in both orders; the new table's tp 2 traced
#   OUT=/tmp/out PART=1 bash bench/run_gpu_decode_gemm.sh   (TABLE=path: XLASERVE_SKINNY_GEMM_TABLE)
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${PART:-1}
R=${OUT:?set OUT}/decode_gemm_p$PART
PY=${PYTHON:-python3}
[ -n "${TABLE:-}" ] && export XLASERVE_SKINNY_GEMM_TABLE=$TABLE
source bench/gpu_install.sh && gpu_start "$R" "decode GEMM part $PART" || exit 1
TPS=(--decode-batches 1 --all-reduce custom --no-prefill --greedy-steps 4 --child-timeout 200)
run_tp() {  # name tps mode [extra...]
  local name=$1 tps=$2 mode=$3; shift 3
  timeout -s ABRT -k 5 420 env ${TBL:+XLASERVE_SKINNY_GEMM_TABLE=$TBL} \
    $PY bench/tp_scaling.py --tp $tps "${TPS[@]}" --decode-gemm "$mode" \
    "$@" --out "$R/$name.json" > "$R/$name.log" 2>&1
  echo "=== $name rc=$? at $((SECONDS - T0))s"; grep -E "decode B=1|skinny_gemm" "$R/$name.log" | head -8
}
if [ "$PART" = 1 ]; then
  JAX_PLATFORMS=cuda timeout -k 5 120 $PY -m pytest -q -rfs --tb=short -p no:cacheprovider \
    tests/kernels/test_skinny_gemm.py > "$R/pytest_skinny.txt" 2>&1
  echo "=== pytest skinny rc=$? at $((SECONDS - T0))s"; tail -3 "$R/pytest_skinny.txt"
  JAX_PLATFORMS=cuda timeout -k 5 150 $PY -m pytest -q -rfs --tb=short -p no:cacheprovider \
    tests/sharding/test_all_reduce.py > "$R/pytest_all_reduce.txt" 2>&1
  echo "=== pytest all_reduce rc=$? at $((SECONDS - T0))s"; tail -3 "$R/pytest_all_reduce.txt"
  run_tp ab1_xla "1 2" xla
  run_tp ab1_auto "1 2" auto
elif [ "$PART" = 4 ]; then  # the final commit: its GPU tests and the default plan at tp 1 and 2
  JAX_PLATFORMS=cuda timeout -k 5 120 $PY -m pytest -q -rfs --tb=short -p no:cacheprovider \
    tests/kernels/test_skinny_gemm.py tests/sharding/test_all_reduce.py \
    > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -3 "$R/pytest_gpu.txt"
  run_tp ab4_auto "1 2" auto
elif [ "$PART" = 3 ]; then
  NEW=${NEW:?set NEW to the sweep table}
  run_tp ab3_xla_a "1 2" xla
  TBL=$NEW run_tp ab3_new_a "1 2" auto --trace-dir /tmp/tr_new --trace-steps 3
  run_tp ab3_old_tp2 2 auto
  TBL=$NEW run_tp ab3_new_b "1 2" auto
  run_tp ab3_xla_b "1 2" xla
  [ -d /tmp/tr_new ] && tar czf "$R/trace_new.tgz" -C /tmp tr_new
else
  run_tp ab2_auto_tp2 2 auto --trace-dir /tmp/tr_auto --trace-steps 3
  run_tp ab2_xla_tp2 2 xla
  [ -d /tmp/tr_auto ] && tar czf "$R/trace_auto.tgz" -C /tmp tr_auto
  (cd bench && timeout -k 5 200 $PY gemm_decode.py --tp 1 2 --only \
     qkv_tp2,o_tp2,down_tp2,qkv_tp1,o_tp1,down_tp1 --no-forced --quick \
     --out "$R/gemm_sweep.json" --write-table "$R/skinny_gemm_tuning.json" > "$R/gemm_sweep.log" 2>&1)
  echo "=== sweep rc=$? at $((SECONDS - T0))s"; grep -E "MB|wrote" "$R/gemm_sweep.log"
fi
$PY - "$R" <<'PY' | tee "$R/summary.txt"
import glob, json, os, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/ab*.json")):
    d = json.load(open(f))
    for x in d["results"]:
        print(f"{os.path.basename(f)} tp{x['tp']} decode_gemm {x.get('decode_gemm')} "
              f"table {x.get('skinny_gemm_table')}: "
              f"{x['decode']['1']['step_ms']} ms, greedy {x['greedy_tokens']}")
    print("   scaling", d.get("scaling"), "checks", d.get("checks"))
PY
