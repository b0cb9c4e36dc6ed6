#!/usr/bin/env bash
# Session 15: L2 prefetch of decode GEMM weights during latency-bound kernels.
# PART=warm and warmtrace ran at commits 5f3f2ee / 7bba2a6: the fused all-reduce's warming CTAs
# and tp_scaling's --warm-mib were removed after them (no gain in the model,
# bench/results/session15_h200x2/README.md), so those parts run only at those commits.
#   PART=l2 (one GPU): bench/l2_prefetch.py (spin kernel +- prefetch, then the GEMM, per layer
#           of a 12-layer chain with distinct weights; the 8B shape's decode GEMMs).
#   PART=host (two GPUs): is the tp=2 batch-1 step host-bound? tp_scaling with the host's time
#           per step call (dispatch_ms), with a known extra device time per step
#           (--gpu-pad-mib 400: one reduce over 400 MiB on every device, measured at tp=1 too),
#           and with the input embedding replicated (no NCCL all-reduce before the layers).
#   PART=warm (two GPUs): the fused all-reduce's warming CTAs (ShardedRowParallel.warm_bytes):
#           its GPU tests, then tp=2 steps with --warm-mib 4/8/16 against none, both orders,
#           and with SKIP_TEMP (host dispatch).
#   PART=warmtrace (two GPUs): the warming CTAs' GPU test, and tp=2 with and without them traced.
#   OUT=/tmp/out PART=l2 bash bench/run_gpu_s15.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 15 l2 || exit 1
if [ "$PART" = warm ]; then
  JAX_PLATFORMS=cuda timeout -s ABRT -k 5 200 $PY -m pytest -q -x tests/sharding/test_all_reduce.py -k "warm or equals_psum or skips_padding" \
    -p no:cacheprovider > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -2 "$R/pytest_gpu.txt"
  run_tp base_a "1 2"
  run_tp warm8_a 2 --warm-mib 8
  run_tp warm4 2 --warm-mib 4
  run_tp base_b 2
  run_tp warm16 2 --warm-mib 16
  run_tp warm8_b 2 --warm-mib 8
  run_tp skiptemp_warm8 2 --warm-mib 8 --xla-flags=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
  run_tp base_c 2
fi
if [ "$PART" = warmtrace ]; then  # why warming did not pay: both traced (summaries in the logs)
  JAX_PLATFORMS=cuda timeout -s ABRT -k 5 200 $PY -m pytest -q -rfs tests/sharding/test_all_reduce.py \
    -k "warm" -p no:cacheprovider > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -2 "$R/pytest_gpu.txt"
  run_tp base_t 2 --trace-dir /tmp/tr_base --trace-steps 3
  run_tp warm8_t 2 --warm-mib 8 --trace-dir /tmp/tr_warm --trace-steps 3
fi
if [ "$PART" = host ]; then
  run_tp base_a "1 2"
  run_tp pad_tp2 2 --gpu-pad-mib 400
  run_tp pad_tp1 1 --gpu-pad-mib 400
  run_tp repemb_a 2 --replicate-embedding
  run_tp base_b 2
  run_tp repemb_b 2 --replicate-embedding
  run_tp pad_tp2_b 2 --gpu-pad-mib 400
fi
if [ "$PART" = l2 ]; then
  timeout -s ABRT -k 5 400 $PY bench/l2_prefetch.py ${SHAPES:+--shapes $SHAPES} \
    --out "$R/l2_prefetch.json" > "$R/l2_prefetch.log" 2>&1
  echo "=== l2_prefetch rc=$? at $((SECONDS - T0))s"
  tail -5 "$R/l2_prefetch.log"
fi
tar czf "$OUT/s15_$PART.tgz" -C "$OUT" "s15_$PART" && rm -rf "$R"
