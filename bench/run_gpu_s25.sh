#!/usr/bin/env bash
# Session 25 (issue 6): the KV-split combine as one XLA fusion, which trigger families
# (pallas_kernels/pdl.py) each tp wants, and the all-reduce's counter order. Every variant lost
# or changed nothing and was removed: part a needs commit 972555e, part b commit 83db79b, part c
# commit f4ee8fb (bench/results/session25_h200x2/README.md).
#   a: the compiled combine tests; then runs <variant>_<tp>[b][_t] (A/B/A/B, the steady-state
#     slope; _t traced): base (the committed defaults), un (table entry "combine": "unrolled",
#     written by bench/attention_table_variant.py: the splits as static slices, so XLA can make
#     one fusion), all (every trigger family, XLASERVE_EARLY_LAUNCH=1), allun (both); at tp=1
#     also gemm / rope / attn (the default plus that family: which one costs tp=1 the time).
#   b: how the all-reduce reads its call counter (sharding/all_reduce_ptx.py counter_mode,
#     XLASERVE_AR_COUNTER): the compiled all-reduce tests on the 2 GPUs with "early" and with
#     "prefetch", then runs <variant>_2[b|c]: ch ("chained", the default: the rank, then the
#     counter), ea ("early": every rank's counter copied into shared memory by cp.async before
#     the rank is known), pf ("prefetch": every rank's counter line prefetched into L2 first).
#   c: attention's KV splits merged inside the attention kernel by each tile's last split
#     (table entry "combine": "kernel"; a per-tile counter, zeros made per call): the compiled
#     combine tests, then runs <variant>_<tp>[b][_t]: base, km.
#   OUT=/tmp/out PART=a|b|c bash bench/run_gpu_s25.sh  (2 GPUs; carry .whl)
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
  for m in early prefetch; do
    XLASERVE_AR_COUNTER=$m GPU_TESTS_TIMEOUT=100 \
      GPU_TESTS_K="chain_of or skips_padding or sums_split_k or equals_psum" \
      gpu_tests tests/sharding/test_all_reduce.py
    cp "$R/pytest_gpu.txt" "$R/pytest_gpu_$m.txt"
  done
  env_of() {
    case $1 in ea) echo XLASERVE_AR_COUNTER=early ;; pf) echo XLASERVE_AR_COUNTER=prefetch ;; esac
  }
  run_variants "ch_2 ea_2 pf_2 ch_2b ea_2b pf_2b ea_2c ch_2c" 520
  exit 0
fi
if [ "$PART" = c ]; then
  GPU_TESTS_K="not Interpret and (attention or merge)" gpu_tests tests/kernels/test_combine_splits.py
  $PY bench/attention_table_variant.py --set combine='"kernel"' --out /tmp/at_km.json || exit 1
  at_of() { [ "$1" = km ] && echo /tmp/at_km.json; }
  run_variants "base_2 km_2 base_2b km_2b base_1 km_1 base_1b km_1b km_2_t" 470
  exit 0
fi
echo "unknown PART=$PART"; exit 2
