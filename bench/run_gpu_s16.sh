#!/usr/bin/env bash
# Session 16: o_proj's skinny GEMM merges attention's KV splits (skinny_gemm_combine), saving
# the flash-decoding combine's launch per layer.
#   PART=merge (two GPUs): the combine GEMM's compiled kernel tests; tp=1 and tp=2 batch-1
#           decode with the merge (the default) and without (--no-merge-splits), tp=2 in both
#           orders; tp=1 with an o_proj entry in the skinny GEMM table (TBL: tp=1's o_proj
#           through the kernel, merged or not) against the default table; a traced tp=2 run.
#           Runs only at commit c80ebe4: the merge lost (tp=2 +130-170 us per step) and was
#           removed (bench/results/session16_h200x2/README.md).
#   PART=pdl (two GPUs): XLA's programmatic dependent launch (--xla_gpu_enable_pdl): the PDL
#           flags the CUDA plugin knows, the all-reduce and attention GPU tests with the flag,
#           and tp=1 / tp=2 batch-1 decode with and without it, in both orders.
#   PART=pdl2 (two GPUs): tp=2 with neither, PDL, and PDL + --xla_gpu_enable_pdl_launch (XLA's
#           Triton GEMMs let the next kernel start before their epilogue), in both orders.
#   OUT=/tmp/out PART=merge bash bench/run_gpu_s16.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 16 merge || exit 1
if [ "$PART" = merge ]; then
  JAX_PLATFORMS=cuda timeout -s ABRT -k 5 150 $PY -m pytest -q -rfs \
    tests/kernels/test_skinny_gemm_combine.py -p no:cacheprovider > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -2 "$R/pytest_gpu.txt"
  # the table with tp=1's o_proj shape (K 4096, N 4096; session 11's best tiles, dropped in
  # session 12 when the combine still ran before it)
  O1=/tmp/skinny_o_tp1.json
  $PY - "$O1" <<'PY'
import json, sys
from xlaserve.pallas_kernels import ops
d = json.loads(ops.SKINNY_GEMM_TABLE.read_text())
d["entries"].append({"name": "o_tp1", "k": 4096, "n": 4096, "dtype": "bfloat16", "block_n": 32,
                     "block_k": 128, "num_splits": 2, "num_warps": 4, "num_stages": 4})
open(sys.argv[1], "w").write(json.dumps(d))
PY
  run_tp base_a "1 2"
  run_tp nomerge_a 2 --no-merge-splits
  run_tp merge_b 2
  run_tp nomerge_b 2 --no-merge-splits
  TBL=$O1 run_tp o1_merge 1
  TBL=$O1 run_tp o1_nomerge 1 --no-merge-splits
  run_tp base1_b 1
  TBL=$O1 run_tp o1_merge_b 1
  run_tp merge_c 2
  if [ $((SECONDS - T0)) -lt 470 ]; then
    run_tp merge_t 2 --trace-dir /tmp/tr_merge --trace-steps 3
  fi
fi
if [ "$PART" = pdl ]; then
  PDL=--xla_gpu_enable_pdl=true
  for f in $($PY -c "import jax_plugins, jaxlib, os; print(' '.join(os.path.join(d, f) for p in [*jax_plugins.__path__, os.path.dirname(jaxlib.__file__)] for d, _, fs in os.walk(p) for f in fs if f.endswith('.so')))" 2>/dev/null); do
    strings "$f" | grep -E "^-?-?xla_gpu[a-z_]*pdl[a-z_]*$" | sort -u | sed "s|^|$(basename "$f"): |"
  done | tee "$R/pdl_flags.txt"
  XLA_FLAGS=$PDL JAX_PLATFORMS=cuda timeout -s ABRT -k 5 150 $PY -m pytest -q -rfs \
    tests/sharding/test_all_reduce.py tests/kernels/test_rope_write_kv.py -p no:cacheprovider \
    > "$R/pytest_gpu_pdl.txt" 2>&1
  echo "=== pytest (PDL) rc=$? at $((SECONDS - T0))s"; tail -2 "$R/pytest_gpu_pdl.txt"
  run_tp base_a "1 2"
  run_tp pdl_a "1 2" --xla-flags=$PDL
  run_tp base_b "1 2"
  run_tp pdl_b "1 2" --xla-flags=$PDL
  if [ $((SECONDS - T0)) -lt 480 ]; then
    run_tp pdl_t 2 --xla-flags=$PDL --trace-dir /tmp/tr_pdl --trace-steps 3
  fi
fi
if [ "$PART" = pdl2 ]; then  # PDL with XLA's early launch of dependents in its Triton GEMMs
  PDL=--xla_gpu_enable_pdl=true
  BOTH="--xla_gpu_enable_pdl=true --xla_gpu_enable_pdl_launch=true"
  run_tp base_a 2
  run_tp pdl_a 2 --xla-flags=$PDL
  run_tp launch_a 2 "--xla-flags=$BOTH"
  run_tp base_b 2
  run_tp launch_b 2 "--xla-flags=$BOTH"
  run_tp pdl_b 2 --xla-flags=$PDL
  run_tp base_c 2
  if [ $((SECONDS - T0)) -lt 420 ]; then
    run_tp launch1 1 "--xla-flags=$BOTH"
  fi
fi
tar czf "$OUT/s16_$PART.tgz" -C "$OUT" "s16_$PART" && rm -rf "$R"
