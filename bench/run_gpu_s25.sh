#!/usr/bin/env bash
# Session 25 (issue 6): the KV-split combine as one XLA fusion, and which trigger families
# (pallas_kernels/pdl.py) each tp wants.
#   a: the compiled combine tests; then runs <variant>_<tp>[b][_t] (A/B/A/B, the steady-state
#     slope; _t traced): base (the committed defaults), un (table entry "combine": "unrolled",
#     written by bench/attention_table_variant.py: the splits as static slices, so XLA can make
#     one fusion), all (every trigger family, XLASERVE_EARLY_LAUNCH=1), allun (both); at tp=1
#     also gemm / rope / attn (the default plus that family: which one costs tp=1 the time).
#   b: the all-reduce's call counter loaded before the rank (sharding/all_reduce_ptx.py,
#     counter_mode "early", the new default) against "chained" (XLASERVE_AR_COUNTER=chained:
#     the rank, then the counter): the compiled all-reduce tests on the 2 GPUs, the plain
#     kernel's chain microbenchmark (bench/all_reduce.py) in both modes, then runs
#     <variant>_<tp>[b|c][_t]: base (early), ch (chained).
#   OUT=/tmp/out PART=a|b bash bench/run_gpu_s25.sh  (2 GPUs; carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 25 a || exit 1
if [ "$PART" = a ]; then
  GPU_TESTS_K="not Interpret" gpu_tests tests/kernels/test_combine_splits.py
  $PY bench/attention_table_variant.py --set combine='"unrolled"' --out /tmp/at_un.json || exit 1
  at_of() { case $1 in un|allun) echo /tmp/at_un.json ;; esac; }
  el_of() {
    case $1 in
      all|allun) echo 1 ;; gemm) echo skinny_gemm_swiglu,skinny_gemm ;;
      rope) echo skinny_gemm_swiglu,rope_write_kv ;;
      attn) echo skinny_gemm_swiglu,ragged_paged_attention ;;
    esac
  }
  run_variants "base_2 un_2 all_2 allun_2 base_2b un_2b all_2b allun_2b base_1 un_1 base_1b un_1b gemm_1 rope_1 attn_1 un_2_t" 530
  exit 0
fi
if [ "$PART" = b ]; then
  GPU_TESTS_TIMEOUT=150 gpu_tests tests/sharding/test_all_reduce.py
  for m in early chained early2 chained2; do
    XLASERVE_AR_COUNTER=${m%2} timeout -s ABRT -k 5 120 $PY bench/all_reduce.py --tp 2 \
      --tokens 1 --out "$R/ar_$m.json" > "$R/ar_$m.log" 2>&1
    echo "=== ar $m rc=$?"; grep tokens "$R/ar_$m.log"
  done
  env_of() { [ "$1" = ch ] && echo XLASERVE_AR_COUNTER=chained; }
  run_variants "base_2 ch_2 base_2b ch_2b base_1 base_2c ch_2c base_2_t" 540
  exit 0
fi
echo "unknown PART=$PART"; exit 2
