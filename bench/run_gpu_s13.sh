#!/usr/bin/env bash
# Session 13 on 2 GPUs: q/k/v's epilogue as one kernel (pallas_kernels/rope_write_kv.py: split-K
# sum + rope + K/V write after the skinny GEMM) and the fused all-reduce skipping the padding
# rows (a batch-1 step pads 1 token to 16 rows), each A/B'd against session 12's default.
#   PART=1: GPU tests (rope_write_kv compiled; the all-reduce tests on 2 GPUs, padding rows
#           included); tp_scaling: base (both off) tp 1+2, new (both on) tp 2 traced,
#           rope only, padding only, new again tp 1+2
#   PART=2: (commit after call 1: rope_write_kv one program per head, padding rows skipped;
#           the all-reduce's row-count load overlapped) the other order (new first), base
#           again, tp=1 with a q/k/v table entry (so the epilogue kernel runs at tp=1 too),
#           both tps with XLA's SKIP_TEMP command-buffer update mode, and the engine at tp 2
#           (builtin model, --decode-gemm pallas vs xla: same greedy tokens)
#   PART=3: the final plan (table with the tp=1 q/k/v entry: the epilogue kernel at tp=1 too):
#           tp 1+2, tp 2 again, the engine at tp 2 (pallas vs xla), then the GPU tests while
#           time is left. (Call 3 ran it at commit 024bb84 with an embedding change A/B'd by
#           --no-embed-all-reduce; the change lost and was removed with the flag.)
#   OUT=/tmp/out PART=1 bash bench/run_gpu_s13.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${PART:-1}
R=${OUT:?set OUT}/s13_p$PART
PY=${PYTHON:-python3}
source bench/gpu_install.sh && gpu_start "$R" "session 13 part $PART" || exit 1
TPS=(--decode-batches 1 --all-reduce custom --no-prefill --greedy-steps 4 --child-timeout 200)
BASE=(--no-rope-write --no-skip-padding)
run_tp() {  # name tps [extra...]
  local name=$1 tps=$2; shift 2
  timeout -s ABRT -k 5 420 env ${TBL:+XLASERVE_SKINNY_GEMM_TABLE=$TBL} \
    $PY bench/tp_scaling.py --tp $tps "${TPS[@]}" "$@" --out "$R/$name.json" \
    > "$R/$name.log" 2>&1
  echo "=== $name rc=$? at $((SECONDS - T0))s"; grep -E "decode B=1" "$R/$name.log" | head -4
}
if [ "$PART" = 1 ]; then
  JAX_PLATFORMS=cuda timeout -k 5 200 $PY -m pytest -q -rfs --tb=short -p no:cacheprovider \
    tests/kernels/test_rope_write_kv.py tests/sharding/test_all_reduce.py \
    > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -4 "$R/pytest_gpu.txt"
  run_tp base_a "1 2" "${BASE[@]}"
  run_tp new_a 2 --trace-dir /tmp/tr_new --trace-steps 3
  run_tp rope_a 2 --no-skip-padding
  run_tp pad_a 2 --no-rope-write
  run_tp new_b "1 2"
  [ -d /tmp/tr_new ] && tar czf "$R/trace_new.tgz" -C /tmp tr_new
elif [ "$PART" = 3 ]; then
  run_tp final_a "1 2"
  run_tp final_b 2
  gpu_cli_gemm_check "$R"
  echo "rope_write_kv log lines: $(grep -c 'rope_write_kv kernel' "$R/cli_pallas.log")"
  left=$((510 - (SECONDS - T0)))
  if [ $left -gt 60 ]; then
    JAX_PLATFORMS=cuda timeout -k 5 $left $PY -m pytest -q -rfs --tb=short \
      -p no:cacheprovider tests/sharding/test_all_reduce.py tests/kernels/test_rope_write_kv.py \
      > "$R/pytest_gpu.txt" 2>&1
    echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -4 "$R/pytest_gpu.txt"
  fi
else
  $PY - <<'PY'
import json
from xlaserve.pallas_kernels import ops
d = json.loads(ops.SKINNY_GEMM_TABLE.read_text())
d["entries"].append({"name": "qkv_tp1", "k": 4096, "n": 6144, "dtype": "bfloat16", "block_n": 64,
                     "block_k": 128, "num_splits": 4, "num_warps": 4, "num_stages": 4})
open("/tmp/tbl_qkv1.json", "w").write(json.dumps(d))
PY
  JAX_PLATFORMS=cuda timeout -k 5 120 $PY -m pytest -q -rfs --tb=short -p no:cacheprovider \
    tests/kernels/test_rope_write_kv.py > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -2 "$R/pytest_gpu.txt"
  run_tp new_c 2 --trace-dir /tmp/tr_new --trace-steps 3
  run_tp base_c "1 2" "${BASE[@]}"
  TBL=/tmp/tbl_qkv1.json run_tp qkv1_c 1
  run_tp skiptemp_c "1 2" --xla-flags=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
  run_tp new_d "1 2"
  [ -d /tmp/tr_new ] && tar czf "$R/trace_new.tgz" -C /tmp tr_new
  gpu_cli_gemm_check "$R"
  echo "rope_write_kv log lines: $(grep -c 'rope_write_kv kernel' "$R/cli_pallas.log")"
fi
$PY - "$R" <<'PY' | tee "$R/summary.txt"
import glob, json, os, sys
for f in sorted(glob.glob(f"{sys.argv[1]}/*.json")):
    d = json.load(open(f))
    for x in d.get("results", []):
        print(f"{os.path.basename(f)} tp{x['tp']} rope_write_kv {x.get('rope_write_kv')} "
              f"skip_padding {x.get('skip_padding_rows')} embed {x.get('embed_all_reduce')}: "
              f"{x['decode']['1']['step_ms']} ms, "
              f"greedy {x['greedy_tokens']}")
    print("   scaling", d.get("scaling"), "checks", d.get("checks"))
PY
