#!/usr/bin/env bash
# Session 27 (issue 6): the batch-1 decode step at tp=2 against tp=1 (bench/results/
# session27_h200x2/README.md). Parts b, c and d need commits cedc03c / c685c55 / fd59fa4: part
# b's mode became the default after it, parts c and d's variants were removed after their A/B.
# Parts e and f need commit 80761d0 (their experiments were removed in session 28).
#   a: the compiled test of the 2-warp attention tiles (session 26's, never run on a GPU), then
#     batch-1 attention launch settings in the table (bench/attention_table_variant.py): runs
#     <variant>_<tp>[b] (the steady-state slope): base (the committed table: small_decode 2
#     warps), w1 (1 warp), st2 / st4 (num_stages 2 / 4 with 2 warps), sp17 (max_splits 17: one
#     64-key block per split at ctx 1025, with 2 warps); tp=2 A/B, then tp=1.
#   b: the all-reduce kernels find their rank from their output pointer (XLASERVE_ALL_REDUCE_RANK
#     =range: AllReduce.ranges, each rank's device allocation) and every thread reads its CTA's
#     counter, so one global load instead of two dependent ones and a barrier precede the first
#     NVLink store: the compiled all-reduce tests of that mode, then runs base / rr at tp=2,
#     A/B/A/B/A/B, and a traced rr run.
#   c: on the ranged default (part b's mode, adopted): the fused kernel with one vector per
#     thread (XLASERVE_ALL_REDUCE_THREADS=row: 512 threads at hidden 4096, so each thread polls
#     the peer's row once, not twice in turn): the compiled all-reduce tests of the new modes,
#     then runs base / rt (row threads) / ld (XLASERVE_ALL_REDUCE_RANK=load: the code before
#     part b) at tp=2, a traced rt run, tp=1 twice (the ratio), then the builtin model's CLI
#     greedy ids at tp=2 against tp=1.
#   d: the fused kernel's epilogue (XLASERVE_ALL_REDUCE_VARIANT): nb (every thread sums the
#     warps' squares itself: one barrier instead of two), lt (the poll reads the clock every
#     256th failed poll only), nblt (both): the compiled fused-kernel tests with nblt, then
#     runs base / nb / lt / nblt at tp=2, A/B.
#   e (written in session 27, not yet run): two experiments. jp: the fused all-reduce's joint
#     wait (XLASERVE_ALL_REDUCE_VARIANT=jp: each thread waits for both its vectors of the peer's
#     row in one loop instead of one after the other). qr / qrk: q/k/v, rope and the K/V write
#     as one kernel (XLASERVE_QKV_ROPE=1 / "16,256,4,4": pallas_kernels/skinny_gemm_rope.py) in
#     place of the skinny GEMM and rope_write_kv (qrw: half-tiles of 32, 96 programs at tp=1).
#     The compiled tests of both, then runs at tp=2 A/B, a traced qr run, and tp=1.
#   f (written in session 27, not yet run): bench/qkv_rope.py, q/k/v + rope in isolation (the
#     split-K GEMM + rope_write_kv against skinny_gemm_rope over its tiles, tp 2 and 1, 8 layers
#     of weights: 200-400 MB, streamed from HBM), to pick part e's tiles. One GPU is enough.
#   OUT=/tmp/out PART=a|b|c|d|e|f bash bench/run_gpu_s27.sh  (2 GPUs; carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 27 a || exit 1
if [ "$PART" = a ]; then
  GPU_TESTS_TIMEOUT=110 GPU_TESTS_K="w2 and not Interpret" gpu_tests tests/kernels/test_ragged_paged_attention.py
  for v in "w1 --small-set num_warps=1" "st2 --set num_stages=2" "st4 --set num_stages=4" \
           "sp17 --small-set max_splits=17"; do
    set -- $v
    $PY bench/attention_table_variant.py "$2" "$3" --out "/tmp/at_$1.json" || exit 1
  done
  at_of() { [ "$1" != base ] && echo "/tmp/at_$1.json"; }
  run_variants "base_2 w1_2 st2_2 st4_2 sp17_2 base_2b w1_2b st2_2b st4_2b sp17_2b base_1 w1_1 st2_1 sp17_1" 470
  exit 0
fi
if [ "$PART" = b ]; then
  GPU_TESTS_K="ranges or True" gpu_tests tests/sharding/test_all_reduce.py
  env_of() { [ "$1" = rr ] && echo XLASERVE_ALL_REDUCE_RANK=range; }
  run_variants "base_2 rr_2 base_2b rr_2b base_2c rr_2c rr_2_t" 470
  exit 0
fi
if [ "$PART" = c ]; then
  GPU_TESTS_K="True or ranges" gpu_tests tests/sharding/test_all_reduce.py
  env_of() { case $1 in rt) echo XLASERVE_ALL_REDUCE_THREADS=row ;;
                        ld) echo XLASERVE_ALL_REDUCE_RANK=load ;; esac; }
  run_variants "base_2 rt_2 ld_2 base_2b rt_2b ld_2b rt_2c base_2c rt_2_t base_1 base_1b" 440
  [ $((SECONDS - T0)) -lt 470 ] && gpu_cli_tp_check "$R"
  pack_results
  exit 0
fi
if [ "$PART" = d ]; then
  XLASERVE_ALL_REDUCE_VARIANT=nblt GPU_TESTS_K="add_rms_norm or fused" \
    gpu_tests tests/sharding/test_all_reduce.py
  env_of() { [ "$1" != base ] && echo "XLASERVE_ALL_REDUCE_VARIANT=$1"; }
  run_variants "base_2 nb_2 lt_2 nblt_2 base_2b nb_2b lt_2b nblt_2b base_2c nblt_2c" 330
  exit 0
fi
if [ "$PART" = e ]; then
  GPU_TESTS_K="jp or (SkinnyGemmRope and not Interpret)" GPU_TESTS_TIMEOUT=150 gpu_tests \
    tests/sharding/test_all_reduce.py tests/kernels/test_skinny_gemm_rope.py
  env_of() { case $1 in jp) echo XLASERVE_ALL_REDUCE_VARIANT=jp ;;
                        qr) echo XLASERVE_QKV_ROPE=1 ;; qrk) echo XLASERVE_QKV_ROPE=16,256,4,4 ;;
                        qrw) echo XLASERVE_QKV_ROPE=32,256,4,4 ;; esac; }
  run_variants "base_2 jp_2 qr_2 qrk_2 base_2b jp_2b qr_2b qrk_2b qr_2_t base_1 qr_1 qrw_1 base_1b" 470
  exit 0
fi
if [ "$PART" = f ]; then
  timeout -s ABRT -k 5 400 $PY bench/qkv_rope.py --layers 8 --out "$R/qkv_rope.json" \
    > "$R/qkv_rope.log" 2>&1
  echo "=== qkv_rope rc=$? at $((SECONDS - T0))s"; cat "$R/qkv_rope.log" | tail -20
  pack_results
  exit 0
fi
echo "unknown PART=$PART"; exit 2
