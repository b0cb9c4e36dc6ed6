#!/usr/bin/env bash
# Session 23 (issue 6): our Pallas kernels let their dependents launch early (PDL,
# pallas_kernels/pdl.py: griddepcontrol.launch_dependents at each kernel's start).
#   pdl: the compiled skinny GEMM, rope_write_kv and pdl tests; then tp 1 and 2
#     with the trigger on / off (XLASERVE_EARLY_LAUNCH=1 / 0), A/B/A/B, runs named el<0|1>_<tp>[b]
#     with the steady-state slope; traced runs (<name>_t) list the idle time per kernel pair.
#   fam: which kernels' triggers help (tp=2) or hurt (tp=1: +55 us with all on in part pdl):
#     XLASERVE_EARLY_LAUNCH per run, runs named <variant>_<tp>[b]: off (0), all (1), noswig
#     (every family but skinny_gemm_swiglu), swig (skinny_gemm_swiglu only); the compiled
#     pdl and rope_write_kv tests first.
#   verify: the default (gate/up triggers only): compiled pdl and skinny GEMM tests, tp 1 and 2
#     in one run (ratio, greedy tokens), then tp=2 with no trigger (EL=0) and the default again.
#   comb (run in session 24 at commit 59e9719: bench/results/session24_h200x2/; the kernel was
#     removed in session 26): the KV splits merged by the Pallas kernel
#     (pallas_kernels/combine_splits.py) against XLA's fusions: compiled combine_splits and pdl
#     tests, then runs <variant>_<tp>[b][_t]: base (the committed table), pc (table entry
#     "combine": "pallas", written by bench/attention_table_variant.py), pct (pc, and the combine
#     kernel triggers its dependents early: EL=skinny_gemm_swiglu,combine_splits).
#   (fam2, which trigger costs tp=1 the time, ran as part a of bench/run_gpu_s25.sh.)
#   The parts pdl, fam and verify ran at commits e9ff3e2, 17a8de2 and d277c0e (the loops were
#   later folded into run_variants, the same runs; a PTX dump tried there wrote no .ptx files and
#   was dropped); bench/results/session23_h200x2/.
#   OUT=/tmp/out PART=pdl|fam|verify|comb bash bench/run_gpu_s23.sh  (2 GPUs; carry .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 23 pdl || exit 1
if [ "$PART" = comb ]; then
  gpu_tests tests/kernels/test_combine_splits.py tests/kernels/test_pdl.py
  $PY bench/attention_table_variant.py --set combine='"pallas"' --out /tmp/at_pc.json || exit 1
  at_of() { [ "$1" != base ] && echo /tmp/at_pc.json; }
  el_of() { [ "$1" = pct ] && echo skinny_gemm_swiglu,combine_splits; }
  run_variants "base_2 pc_2 pct_2 base_2b pc_2b pct_2b base_1 pc_1 pct_1 base_1b pc_1b pct_2_t" 500
  exit 0
fi
if [ "$PART" = verify ]; then
  gpu_tests tests/kernels/test_pdl.py tests/kernels/test_skinny_gemm.py
  run_tp new12 "1 2" --slope-iters ${SLOPE:-80}
  grep -E '"(greedy_equal_tp2|decode_b1_speedup_tp2|decode_b1_speedup_tp2_slope|meets_1p6x_decode_b1_tp2)"' "$R/new12.log"
  el_of() { [ "$1" = off ] && echo 0; }
  run_variants "off_2 def_2b off_2b" 360
  exit 0
fi
if [ "$PART" = fam ]; then
  gpu_tests tests/kernels/test_pdl.py tests/kernels/test_rope_write_kv.py
  el_of() {
    case $1 in
      off) echo 0 ;; all) echo 1 ;; swig) echo skinny_gemm_swiglu ;;
      noswig) echo skinny_gemm,rope_write_kv,ragged_paged_attention ;;
    esac
  }
  run_variants "off_2 noswig_2 all_2 swig_2 off_1 noswig_1 all_1 swig_1 off_1b noswig_1b" 520
  exit 0
fi
if [ "$PART" = pdl ]; then
  gpu_tests tests/kernels/test_skinny_gemm.py tests/kernels/test_rope_write_kv.py \
    tests/kernels/test_pdl.py
  el_of() { echo "${1:2:1}"; }  # el1 / el0
  run_variants "el1_2 el0_2 el1_2b el0_2b el1_1 el0_1 el1_1b el0_1b el1_2_t el0_2_t" 520
  exit 0
fi
