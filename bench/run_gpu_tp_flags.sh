#!/usr/bin/env bash
# One call on 2 GPUs (issue 6): tp=1 vs tp=2 decode step of the 8B shape with a kernel trace,
# then tp=2 under XLA collective settings, each in its own process (flags apply at backend start):
#   oneshot  XLA's one-shot all-reduce kernel for small messages (peer-to-peer stores; no NVLink
#            multicast: NCCL_NVLS_ENABLE=0 stays set)
#   cbcoll   all-reduces recorded into the command buffers (+COLLECTIVES)
#   both     the two together
#   OUT=/tmp/out bash bench/run_gpu_tp_flags.sh      SETS="oneshot" OUT=... (some sets only)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
R=${OUT:?set OUT}/tpf
PY=${PYTHON:-python3}
mkdir -p "$R"
exec > >(tee -a "$R/session.log") 2>&1
echo "date $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name --format=csv,noheader; nvidia-smi topo -m 2>/dev/null | head -5
source bench/gpu_install.sh && gpu_install || exit 1
declare -A FLAGS=(
  [oneshot]="--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true"
  [cbcoll]="--xla_gpu_enable_command_buffer=+COLLECTIVES"
  [both]="--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true --xla_gpu_enable_command_buffer=+COLLECTIVES"
)
T0=$SECONDS
timeout -k 5 "${BASE_S:-170}" $PY bench/tp_scaling.py --tp 1 2 --decode-batches 1 \
  --trace-dir /tmp/tr_base --out "$R/tp_base.json" 2>&1 | grep -v "^ \|^--" 
echo "=== base rc=$? at $((SECONDS - T0))s"
for name in ${SETS:-oneshot cbcoll both}; do
  XLA_FLAGS="${FLAGS[$name]}" timeout -k 5 "${SET_S:-110}" $PY bench/tp_scaling.py --tp 2 \
    --decode-batches 1 --trace-dir "/tmp/tr_$name" --out "$R/tp_$name.json" 2>&1 | grep -v "^ \|^--"
  echo "=== $name rc=$? at $((SECONDS - T0))s"
done
$PY - "$R" <<'PY'
import json, sys, pathlib
r = pathlib.Path(sys.argv[1])
base = json.loads((r / "tp_base.json").read_text()) if (r / "tp_base.json").exists() else None
ref = None
if base:
    ref = {x["tp"]: x for x in base["results"]}
for f in sorted(r.glob("tp_*.json")):
    d = json.loads(f.read_text())
    for x in d["results"]:
        dec = x["decode"]["1"]
        fam = {}
        for t in dec.get("trace", {}).get("threads", []):
            if t["device"] and t["busy_us_per_step"] > 1000:
                fam = {k: round(v) for k, v in t["families_us_per_step"].items()}
                fam["busy"] = round(t["busy_us_per_step"]); fam["span"] = round(t["span_us_per_step"])
                break
        same = ref and x["greedy_tokens"] == ref[1]["greedy_tokens"]
        print(f.name, "tp", x["tp"], "decode_b1_ms", dec["step_ms"], "prefill_ms",
              x["prefill"]["step_ms"], "greedy==tp1", same, fam)
PY
tar czf "$OUT/tpf.tgz" -C "$OUT" tpf
