#!/usr/bin/env bash
# Session 20 (issue 6): what sets the decode GEMMs' time, and gate/up with SwiGLU in one kernel.
#   OUT=/tmp/out COMMIT=<hash> PART=layout|ncu|verify|swiglu|swiglut bash bench/run_gpu_s20.sh
# (carry .whl). layout/ncu/swiglut: one H200; verify: 2 GPUs; swiglu: 2 GPUs for tp=2 runs.
# Commands and results: bench/results/session20_h200*/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 20 layout || exit 1
# write_cand CAND BASE: the committed skinny GEMM table without its skinny_gemm_swiglu entries
# (BASE) and with candidate ones for the 8B gate/up (CAND; tiles bn/bk/warps/stages from T2 and
# T1; calls 8-9 ran 32/128/4/4 and 64/128/4/4, call 12 T2=64/128/4/4, call 11 T1=128/64/8/4)
write_cand() {
  $PY - "$1" "$2" <<'PY'
import json, os, sys
t = json.load(open("pallas_kernels/skinny_gemm_tuning.json"))
t["entries"] = [e for e in t["entries"] if not e.get("epilogue")]
json.dump(t, open(sys.argv[2], "w"), indent=1)
for name, n, tile in (("gate_up_swiglu_tp2", 14336, os.environ.get("T2", "32/128/4/4")),
                      ("gate_up_swiglu_tp1", 28672, os.environ.get("T1", "64/128/4/4"))):
    bn, bk, warps, stages = map(int, tile.split("/"))
    t["entries"].append({"name": name, "k": 4096, "n": n, "dtype": "bfloat16",
                         "epilogue": "swiglu", "block_n": bn, "block_k": bk, "num_splits": 1,
                         "num_warps": warps, "num_stages": stages})
json.dump(t, open(sys.argv[1], "w"), indent=1)
PY
}
if [ "$PART" = layout ]; then  # kn / nk / tiled weights, tp=2 shapes then tp=1's q/k/v
  cd bench
  timeout -s ABRT -k 5 ${LIMIT:-540} $PY gemm_layout.py ${QUICK---quick} --out "$R/layout.json" \
    --variants ${VARIANTS:-kn,nk,tiled} ${TRACE:+--trace-dir /tmp/tr20} \
    --only ${ONLY:-qkv_tp2,o_tp2,down_tp2,gate_up_tp2,qkv_tp1} 2>&1 | grep -v Warning
  echo "=== layout rc=$? at $((SECONDS - T0))s"
fi
if [ "$PART" = ncu ]; then  # hardware counters of single skinny GEMMs (cold: ncu flushes caches)
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  echo "ncu: ${NCU:-none}"
  cd bench
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -s ABRT -k 5 ${LIMIT:-400} "$NCU" \
    --clock-control none -k "regex:layout|uneven|gemm|dot" --set detailed \
    -f -o "$R/gemm_ncu" $PY gemm_layout.py --single "$SINGLE" 2>&1 | grep -v Warning | tail -30
  echo "=== ncu rc=$? at $((SECONDS - T0))s"
  "$NCU" --import "$R/gemm_ncu.ncu-rep" --page details --print-units base > "$R/gemm_ncu.txt"
  "$NCU" --import "$R/gemm_ncu.ncu-rep" --page raw --csv --print-units base > "$R/gemm_ncu_raw.csv"
  grep -E "^  [a-z_]+.*\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Shared Memory Config|Block Size|Grid Size|Waves Per SM|Warp Cycles Per Issued|Stall|L2 Hit|Theoretical Occ" "$R/gemm_ncu.txt" | head -300
fi
if [ "$PART" = verify ]; then  # 2 GPUs: the shared primary-context helpers (runtime/hardware.py)
  # in both callers: enable_peer_access (the all-reduce at tp=2: the builtin model through the
  # CLI, tp 2 vs 1, and the fused all-reduce tests) and cuda_memory_info (KV sizing under SKIP_TEMP)
  $PY -c 'import jax
from xlaserve.runtime import hardware
for d in jax.devices():
    print("cuda_memory_info", d.id, hardware.cuda_memory_info(int(d.local_hardware_id)))'
  gpu_cli_tp_check "$R"
  JAX_PLATFORMS=cuda timeout -s ABRT -k 5 200 $PY -m pytest -q -rfs --tb=short \
    -p no:cacheprovider tests/sharding/test_all_reduce.py -k "chain or skips_padding" > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -3 "$R/pytest_gpu.txt"
  timeout -s ABRT -k 5 150 env XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP \
    $PY bench/throughput.py --model bench/configs/llama3.1-8b --load-format dummy \
    --cases 128/128:256 --max-num-seqs 256 --max-num-batched-tokens 2048 \
    --out "$R/thr_skip.json" > "$R/thr_skip.log" 2>&1
  echo "=== thr_skip rc=$? at $((SECONDS - T0))s"
  $PY -c 'import json, sys
d = json.load(open(sys.argv[1])); c = d["cases"][0]
print("thr_skip num_pages", d["engine"]["num_pages"], "tok/s", round(c["output_tokens_per_s"]),
      "preemptions", c["preemptions"])' "$R/thr_skip.json"
fi
if [ "$PART" = swiglu ]; then  # 2 GPUs: gate/up + SwiGLU's activation in one kernel (A/B)
  # candidate table = the committed one + swiglu entries for the 8B gate/up at tp 2 and 1;
  # each run its own processes, candidate first (later processes tend to run faster)
  CAND=/tmp/cand_table.json; BASE=/tmp/base_table.json; write_cand $CAND $BASE
  for r in ${RUNS:-cand2 base2 cand1 base1 cand2b base2b}; do  # name: cand|base + tp (+ tag)
    tp=${r//[!0-9]/}; tp=${tp:0:1}
    if [ $((SECONDS - T0)) -gt ${STOP_AT:-400} ]; then echo "=== $r skipped (time)"; continue; fi
    if [ "${r:0:4}" = cand ]; then TBL=$CAND run_tp $r $tp; else TBL=$BASE run_tp $r $tp; fi
  done
  grep -h -iE "swiglu|greedy" "$R"/*.log | sort | uniq -c | head -20
fi
if [ "$PART" = swiglut ]; then  # one GPU: why the gated kernel lost (traced tp=1 steps)
  CAND=/tmp/cand_table.json; BASE=/tmp/base_table.json; write_cand $CAND $BASE
  JAX_PLATFORMS=cuda timeout -s ABRT -k 5 120 $PY -m pytest -q -rfs --tb=long \
    -p no:cacheprovider tests/kernels/test_skinny_gemm.py -k "swiglu and not Interpret and f32" \
    > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; grep -E "Mismatch|Max abs|Max rel|assert|Error" "$R/pytest_gpu.txt" | head -12
  TBL=$CAND run_tp cand1_t 1 --trace-dir /tmp/trc --trace-steps 3
  TBL=$BASE run_tp base1_t 1 --trace-dir /tmp/trb --trace-steps 3
  for n in cand1_t base1_t; do echo "$n"; trace_render "$R/$n.json"; done
fi
tar czf "$OUT/s20_$PART.tgz" -C "$OUT" "s20_$PART" 2>/dev/null
