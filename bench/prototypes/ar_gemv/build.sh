#!/usr/bin/env bash
# Builds the PTX of ar_norm_gemv.cu (needs nvcc). The PTX is not committed: carry this folder to
# the GPU machine, which needs no CUDA toolkit. The header is lowered to PTX ISA 8.0 (CUDA 12.0+
# drivers): the kernel uses nothing newer. Variants: ar_norm_gemv.ptx (the default), _g1 (the
# loads wait for the row CTAs' pushes), _dbg / _g1dbg / _g2dbg (per-CTA %globaltimer stamps;
# _g2: the loads wait for h), _w2dbg (2 waves of loads in flight),
# _noloaddbg (no weight loads, measurement only).
set -euo pipefail
cd "$(dirname "$0")"
build() {  # OUT FLAGS...
  local out=$1; shift
  nvcc -ptx -arch=sm_90 -O3 "$@" -o "$out" ar_norm_gemv.cu
  sed -i 's/^\.version .*/.version 8.0/' "$out"
  ptxas -arch=sm_90 -v "$out" -o /dev/null 2>&1 | grep -E "registers|spill" || true
}
build ar_norm_gemv.ptx
build ar_norm_gemv_g1.ptx -DGATE_MODE=1 -DSUFFIX=_g1
build ar_norm_gemv_g1dbg.ptx -DGATE_MODE=1 -DDEBUG_STAMPS=1 -DSUFFIX=_g1dbg
build ar_norm_gemv_g2dbg.ptx -DGATE_MODE=2 -DDEBUG_STAMPS=1 -DSUFFIX=_g2dbg
build ar_norm_gemv_dbg.ptx -DDEBUG_STAMPS=1 -DSUFFIX=_dbg
build ar_norm_gemv_w2dbg.ptx -DDEBUG_STAMPS=1 -DWAVES_IN_FLIGHT=2 -DSUFFIX=_w2dbg
build ar_norm_gemv_noloaddbg.ptx -DDEBUG_STAMPS=1 -DNO_LOAD=1 -DSUFFIX=_noloaddbg
