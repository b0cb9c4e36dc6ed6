#!/usr/bin/env bash
# Session 28 (issue 6): session 27's two experiments (written then, never run on a GPU) on the
# batch-1 decode step at tp=2 against tp=1 (bench/results/session28_h200x2/README.md). All four
# parts need the code of their commit: a and b 02d0e24 (the experiments of session 27, removed
# after this session's runs; they stay at 80761d0), c 47e8e78, d 084dd0b (the L2 prefetch,
# removed after its A/B).
#   a: the compiled tests of both (jp: XLASERVE_ALL_REDUCE_VARIANT=jp, the fused all-reduce's
#     joint wait; SkinnyGemmRope: q/k/v, rope and the K/V write as one kernel), then
#     bench/qkv_rope.py (q/k/v + rope in isolation: split-K GEMM + rope_write_kv against
#     skinny_gemm_rope over its tiles, tp 2 and 1) to pick part b's tiles.
#   b: runs <variant>_<tp>[b] (the steady-state slope) at tp=2 A/B, then tp=1: base, jp, qr
#     (XLASERVE_QKV_ROPE=$QR2 at tp 2, $QR1 at tp 1: the tiles part a picked), jq (both).
#   c: the L2 prefetch of o_proj's weight from the attention kernel (XLASERVE_L2_PREFETCH=
#     attention, pallas_kernels/l2_prefetch.py: HBM idles during batch-1 attention; the o GEMM
#     after it then reads L2): its compiled test, then runs base / pf / jp at tp=2 A/B, tp=1
#     base / pf A/B, a traced pf run and pj (pf and jp) at tp=2.
#   d: the skinny GEMM with its weight in HBM or in L2 (bench/l2_gemm.py: how much an L2
#     prefetch could take off o_proj and q/k/v at most), then the prefetch after each attention
#     program's work (pe: XLASERVE_L2_PREFETCH=attention_end) against base, tp=2 and tp=1 A/B.
#   r: the ratio on the default (any commit from 084dd0b on): tp=1 and tp=2 alternated, four
#     runs each.
#   OUT=/tmp/out PART=a|b|c|d|r [QR2=hb,bk,w,s QR1=...] bash bench/run_gpu_s28.sh  (2 GPUs; carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 28 a || exit 1
if [ "$PART" = a ]; then
  GPU_TESTS_K="jp or (SkinnyGemmRope and not Interpret)" GPU_TESTS_TIMEOUT=170 gpu_tests \
    tests/sharding/test_all_reduce.py tests/kernels/test_skinny_gemm_rope.py
  pack_results
  timeout -s ABRT -k 5 $((520 - (SECONDS - T0))) $PY bench/qkv_rope.py --layers 8 \
    --out "$R/qkv_rope.json" > "$R/qkv_rope.log" 2>&1
  echo "=== qkv_rope rc=$? at $((SECONDS - T0))s"; tail -20 "$R/qkv_rope.log"
  pack_results
  exit 0
fi
if [ "$PART" = c ]; then
  GPU_TESTS_K="not Interpret" GPU_TESTS_TIMEOUT=100 gpu_tests tests/kernels/test_l2_prefetch.py
  env_of() { case $1 in
    pf) echo XLASERVE_L2_PREFETCH=attention ;;
    jp) echo XLASERVE_ALL_REDUCE_VARIANT=jp ;;
    pj) echo "XLASERVE_L2_PREFETCH=attention XLASERVE_ALL_REDUCE_VARIANT=jp" ;; esac; }
  run_variants "base_2 pf_2 jp_2 base_2b pf_2b jp_2b base_1 pf_1 base_1b pf_1b pf_2_t pj_2" 480
  exit 0
fi
if [ "$PART" = d ]; then
  GPU_TESTS_K="not Interpret" GPU_TESTS_TIMEOUT=100 gpu_tests tests/kernels/test_l2_prefetch.py
  (cd bench && timeout -s ABRT -k 5 120 $PY l2_gemm.py --out "$R/l2_gemm.json") \
    > "$R/l2_gemm.log" 2>&1
  echo "=== l2_gemm rc=$? at $((SECONDS - T0))s"; cat "$R/l2_gemm.log" | tail -8
  pack_results
  env_of() { [ "$1" = pe ] && echo XLASERVE_L2_PREFETCH=attention_end; }
  run_variants "base_2 pe_2 base_2b pe_2b base_1 pe_1 base_1b pe_1b pe_2_t" 480
  exit 0
fi
if [ "$PART" = r ]; then
  run_variants "base_1 base_2 base_1b base_2b base_1c base_2c base_1d base_2d" 480
  pack_results
  exit 0
fi
if [ "$PART" = b ]; then
  env_of() { case $1 in
    jp) echo XLASERVE_ALL_REDUCE_VARIANT=jp ;;
    qr) echo "XLASERVE_QKV_ROPE=${QR:?}" ;;
    jq) echo "XLASERVE_ALL_REDUCE_VARIANT=jp XLASERVE_QKV_ROPE=${QR:?}" ;; esac; }
  for r in ${RUNS:-base_2 jp_2 qr_2 jq_2 base_2b jp_2b qr_2b jq_2b base_1 qr_1 base_1b qr_1b}; do
    tp=${r#*_}; tp=${tp:0:1}
    if [ "$tp" = 2 ]; then QR=${QR2:-1}; else QR=${QR1:-1}; fi
    QR=$QR RUNS=$r run_variants x 470
  done
  pack_results
  exit 0
fi
echo "unknown PART=$PART"; exit 2
