#!/usr/bin/env bash
# Session 18: the all-reduce + residual add + RMSNorm fused with the q/k/v GEMM that follows it
# (bench/prototypes/ar_gemv: the weight tile streams into shared memory while the all-reduce
# waits on NVLink).
#   PART=proto (two GPUs): the prototype's check against AllReduce.add_rms_norm + the skinny
#           GEMM (rows 1, 5, 16), chains of each (both orders), per-CTA stamps of its _dbg
#           variants. Build the PTX first (bash bench/prototypes/ar_gemv/build.sh, needs nvcc;
#           the .ptx files are not committed) and carry bench/prototypes/ar_gemv to the device.
#           Results: bench/results/session18_h200x2/ (README.md there).
#   OUT=/tmp/out PART=proto bash bench/run_gpu_s18.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 18 proto || exit 1
if [ "$PART" = proto ]; then
  timeout -s ABRT -k 5 330 $PY bench/prototypes/ar_gemv/ar_norm_gemv.py --out "$R/proto.json" ${PROTO_ARGS:-} \
    > "$R/proto.log" 2>&1
  echo "=== proto rc=$? at $((SECONDS - T0))s"; tail -80 "$R/proto.log"
fi
tar czf "$OUT/s18_$PART.tgz" -C "$OUT" "s18_$PART" && rm -rf "$R"
