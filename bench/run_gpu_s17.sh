#!/usr/bin/env bash
# Session 17: where the tp=2 step's ~100 us of device idle per step goes (step time minus the
# critical GPU's busy time in session 15-16's traces): XLA's CUDA-graph settings.
#   PART=graphs (two GPUs): tp=1 and tp=2 batch-1 decode with xlaserve's defaults (the step is
#           cut into graphs at the embedding's NCCL all-reduce and the logits' NCCL all-gather);
#           tp=2 with the NCCL collectives captured in the graphs (one graph per step,
#           --xla_gpu_enable_command_buffer=+COLLECTIVES, last tried in session 5 with 65
#           collectives per step), and with no CUDA graphs at all; both orders; a traced run.
#   PART=fused (two GPUs): q/k/v's epilogue inside the attention kernel (rope_write_attention)
#           against rope_write_kv + the attention kernel (--no-fuse-attention): the compiled
#           kernel tests, tp=1 and tp=2 batch-1 decode, tp=2 in both orders, and a traced tp=2
#           run. Runs only at commit 77fb2ab: the fused kernel lost (tp=2 +370 us per step,
#           tp=1 +590) and was removed (bench/results/session17_h200x2/README.md).
#   OUT=/tmp/out PART=graphs bash bench/run_gpu_s17.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 17 graphs || exit 1
if [ "$PART" = graphs ]; then
  CB=--xla_gpu_enable_command_buffer=+COLLECTIVES
  NOCB=--xla_gpu_enable_command_buffer=
  run_tp base_a "1 2"
  run_tp cbcoll_a 2 --xla-flags=$CB
  run_tp nocb_a 2 --xla-flags=$NOCB
  run_tp base_b 2
  run_tp cbcoll_b 2 --xla-flags=$CB
  if [ $((SECONDS - T0)) -lt 470 ]; then
    run_tp cbcoll_t 2 --xla-flags=$CB --trace-dir /tmp/tr_cb --trace-steps 3
  fi
fi
if [ "$PART" = fused ]; then
  JAX_PLATFORMS=cuda timeout -s ABRT -k 5 150 $PY -m pytest -q -rfs -p no:cacheprovider \
    tests/kernels/test_rope_write_attention.py tests/kernels/test_rope_write_kv.py \
    -k "not Interpret and not random" > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -2 "$R/pytest_gpu.txt"
  run_tp fused_a "1 2"
  run_tp nofuse_a 2 --no-fuse-attention
  run_tp fused_b 2
  run_tp nofuse_b 2 --no-fuse-attention
  if [ $((SECONDS - T0)) -lt 420 ]; then
    run_tp nofuse1 1 --no-fuse-attention
  fi
  if [ $((SECONDS - T0)) -lt 480 ]; then
    run_tp fused_t 2 --trace-dir /tmp/tr_fused --trace-steps 3
  fi
fi
tar czf "$OUT/s17_$PART.tgz" -C "$OUT" "s17_$PART" && rm -rf "$R"
