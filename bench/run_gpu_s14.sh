#!/usr/bin/env bash
# Session 14. PART=fold1, swiglu and tp2 ran with the SwiGLU fold into down_proj's skinny GEMM
# (commits b95ec1c, e415c58, 573ef47); the fold lost in the model and its code, its
# --no-fold-swiglu flag and bench/skinny_swiglu.py were removed after, so those parts run only
# at those commits (bench/results/session14_h200{,x2}/README.md).
#   PART=attn (one GPU): batch-1 decode attention as the runner calls it, per-device heads of
#           tp=2 (16 q / 4 KV) and tp=1 (32 / 8) at context 1024 (and 4096 for tp=2): the
#           table's tiles against KV splits 1-32 x pages per block 2/4/8 x stages 2/3
#           (bench/attention_decode_small.py: kernel + split-combine device time per call).
#           COLD=N: the timed calls rotate over N K/V copies, so each reads K/V from HBM as
#           in the model (without it, 20 calls on 2 MB of K/V hit in L2: 5.9 us against the
#           model's 9.0 us per layer at tp=2, call 1).
#   PART=fold1 (one GPU): the skinny GEMM tests compiled (SwiGLU's activation in down_proj's
#           loads included); tp=1 steps: the default, then with a down_proj table entry (so
#           tp=1's down runs the skinny GEMM, with the activation folded in: traced, to see
#           whether XLA copies gate and up out of its merged gate/up GEMM for the kernel), and
#           the same without the fold.
#   PART=swiglu (one GPU): the skinny GEMM tests compiled; bench/skinny_swiglu.py (down_proj
#           with SwiGLU's activation: XLA, split, gated exact / tanh.approx, over tiles)
#           (call 3 found the gated kernel with exp + division 147 us against ~31 per call at
#           tp=1's down_proj shape)
#   PART=tp2 (two GPUs): the all-reduce tests (its loads now issued before the sequence
#           counter's round trip); tp_scaling with the fold (down_proj's gated table entry) and
#           without (--no-fold-swiglu), both orders, one traced; then the engine at tp 2
#           (builtin model through the CLI, --decode-gemm pallas vs xla: same greedy tokens).
#   PART=cli (two GPUs): the final code: the engine at tp 2 (builtin model through the CLI,
#           --decode-gemm pallas vs xla) and the skinny GEMM tests compiled.
#   OUT=/tmp/out PART=attn [COLD=48] bash bench/run_gpu_s14.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 14 attn || exit 1
table_with() {  # out.json name k n block_n block_k splits: the table plus one entry
  $PY - "$@" <<'PY'
import json, sys
from xlaserve.pallas_kernels import ops
out, name, k, n, bn, bk, sp = sys.argv[1:]
d = json.loads(ops.SKINNY_GEMM_TABLE.read_text())
d["entries"].append({"name": name, "k": int(k), "n": int(n), "dtype": "bfloat16",
                     "block_n": int(bn), "block_k": int(bk), "num_splits": int(sp),
                     "num_warps": 4, "num_stages": 4})
open(out, "w").write(json.dumps(d))
PY
}
if [ "$PART" = cli ]; then
  gpu_cli_gemm_check "$R"
  JAX_PLATFORMS=cuda timeout -k 5 150 $PY -m pytest -q -rfs --tb=short -p no:cacheprovider \
    tests/kernels/test_skinny_gemm.py > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -2 "$R/pytest_gpu.txt"
elif [ "$PART" = tp2 ]; then
  JAX_PLATFORMS=cuda timeout -k 5 150 $PY -m pytest -q -rfs --tb=short -p no:cacheprovider \
    tests/sharding/test_all_reduce.py > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -2 "$R/pytest_gpu.txt"
  run_tp new_a "1 2"
  run_tp nofold_a 2 --no-fold-swiglu
  run_tp nofold_b 2 --no-fold-swiglu --trace-dir /tmp/tr_nofold --trace-steps 3
  run_tp new_b 2 --trace-dir /tmp/tr_new --trace-steps 3
  for t in new nofold; do
    [ -d /tmp/tr_$t ] && tar czf "$R/trace_$t.tgz" -C /tmp tr_$t
  done
  grep -E "us x" "$R/new_b.log" | head -14
  left=$((540 - (SECONDS - T0)))
  [ $left -gt 200 ] && gpu_cli_gemm_check "$R"
elif [ "$PART" = swiglu ]; then
  JAX_PLATFORMS=cuda timeout -k 5 150 $PY -m pytest -q -rfs --tb=short -p no:cacheprovider \
    tests/kernels/test_skinny_gemm.py > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -2 "$R/pytest_gpu.txt"
  timeout -k 5 300 $PY bench/skinny_swiglu.py --out "$R/swiglu.json" > "$R/swiglu.log" 2>&1
  echo "=== swiglu rc=$? at $((SECONDS - T0))s"
  $PY - "$R/swiglu.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(r["k"], r["variant"], r.get("tile"), r.get("us"), r.get("rel_err"), r.get("error", "")[:60])
PY
elif [ "$PART" = fold1 ]; then
  JAX_PLATFORMS=cuda timeout -k 5 150 $PY -m pytest -q -rfs --tb=short -p no:cacheprovider \
    tests/kernels/test_skinny_gemm.py > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -2 "$R/pytest_gpu.txt"
  table_with /tmp/tbl_down1.json down_tp1 14336 4096 64 256 2
  run_tp base1 1
  TBL=/tmp/tbl_down1.json run_tp fold1 1 --trace-dir /tmp/tr_fold1 --trace-steps 3
  TBL=/tmp/tbl_down1.json run_tp nofold1 1 --no-fold-swiglu
  run_tp base1b 1
  grep -E "us x" "$R/fold1.log" | head -30
  [ -d /tmp/tr_fold1 ] && tar czf "$R/trace_fold1.tgz" -C /tmp tr_fold1
elif [ "$PART" = attn ]; then
  COLD=${COLD:-0}
  SW=(--ppb 2 4 8 --splits 1 2 4 8 16 32 --stages 2 3 --table-width 2064
      --calls $((COLD > 20 ? COLD : 20)) --cold $COLD)
  for hk in "16 4 1024 4096" "32 8 1024"; do
    set -- $hk
    h=$1 k=$2; shift 2
    timeout -k 5 240 $PY bench/attention_decode_small.py --heads $h --kv-heads $k \
      --contexts "$@" "${SW[@]}" --out "$R/attn_h${h}_k${k}_c$COLD.json" \
      > "$R/attn_h${h}_k${k}_c$COLD.log" 2>&1
    echo "=== attn $h/$k cold $COLD rc=$? at $((SECONDS - T0))s"
    grep "^==" "$R/attn_h${h}_k${k}_c$COLD.log"
  done
fi
