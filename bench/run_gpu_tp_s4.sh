#!/usr/bin/env bash
# Issue 6 on a 4 x H200 (or 2 x H200) host, in two calls of one lease:
#   PART=a  a bounded cross-device copy test, the builtin model through the CLI at tp 1 and 2
#           (greedy tokens), then bench/tp_scaling.py at tp 1 2 (4) with kernel traces
#   PART=b  tp 2 (4) under XLA collective settings (one-shot all-reduce kernel, +COLLECTIVES, SKIP_TEMP,
#           NCCL in graphs, ...; SETS=...), "default"/"shipped" also at tp 1; GREEDY=1 adds the CLI check
#   PART=a OUT=/tmp/out bash bench/run_gpu_tp_s4.sh
# Each step runs under its own timeout that aborts with Python tracebacks, so a stall shows where.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1
R=${OUT:?set OUT}/tp${PART:?set PART}
PY=${PYTHON:-python3}
NG=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
TPS="1 2"; [ "$NG" -ge 4 ] && TPS="1 2 4"; TPS=${TP_SIZES:-$TPS}
source bench/gpu_install.sh && gpu_session "$R" session.log "gpus $NG tps $TPS"
nvidia-smi topo -m 2>/dev/null | head -6
gpu_install || exit 1
T0=$SECONDS
greedy_cli() {  # the builtin model through the CLI at tp 1 and 2 (f32): same greedy tokens?
  for tp in 1 2; do
    timeout -s ABRT -k 5 150 $PY -m xlaserve generate --model builtin:tiny --dtype float32 \
      --tensor-parallel-size $tp --prompt "The quick brown fox" --max-tokens 32 --temperature 0 \
      --json > "$R/greedy_tp$tp.json" 2> "$R/greedy_tp$tp.log"
    echo "=== tiny tp$tp rc=$? at $((SECONDS - T0))s"; tail -2 "$R/greedy_tp$tp.log"
  done
  $PY - "$R" <<'PY'
import json, sys
t = {tp: json.load(open(f"{sys.argv[1]}/greedy_tp{tp}.json"))["token_ids"] for tp in (1, 2)}
print("CLI greedy token ids tp2 == tp1:", t[1] == t[2], t)
PY
}
if [ "$PART" = a ]; then
  timeout -s ABRT -k 5 40 $PY - <<'PY'
import time, jax, jax.numpy as jnp
d = jax.devices()
x = jax.device_put(jnp.ones((1 << 20,), jnp.float32), d[0]).block_until_ready()
for i in range(1, len(d)):
    t = time.time(); y = jax.device_put(x, d[i]).block_until_ready()
    print(f"d2d 0->{i} {1e3 * (time.time() - t):.1f} ms sum {float(y.sum())}", flush=True)
PY
  echo "=== d2d rc=$? at $((SECONDS - T0))s"
  greedy_cli
  timeout -s ABRT -k 5 ${BASE_S:-330} $PY bench/tp_scaling.py --tp $TPS --decode-batches 1 \
    --trace-dir /tmp/tr_base --out "$R/tp_base.json" 2>&1 | tee "$R/tp_base.log" | grep -v "^ \|^--\|^{\|^}"
  echo "=== base rc=$? at $((SECONDS - T0))s"
else
  [ "${GREEDY:-0}" = 1 ] && greedy_cli
  # Each set runs with exactly its flags (xlaserve's defaults off, its dot-merger flag kept),
  # except "shipped": xlaserve's defaults as a user gets them (runtime/xla_flags.py).
  BASE="--xla_gpu_dot_merger_threshold_mb=512"
  declare -A FLAGS=(
    [oneshot]="--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true"
    [cbcoll]="--xla_gpu_enable_command_buffer=+COLLECTIVES"
    [both]="--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true --xla_gpu_enable_command_buffer=+COLLECTIVES"
    [skiptemp]="--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
    # NCCL instead of XLA's collective kernels, inside the graphs or not (session 5;
    # --xla_gpu_allow_all_reduce_kernel and --xla_gpu_enable_command_buffer_va_remapping, tried
    # in session 4, are not flags of jax 0.11.2's XLA). *_ll, *_ll128: the same with
    # NCCL_PROTO=LL or LL,LL128.
    [nccl]="--xla_gpu_experimental_use_collective_kernels=-ALL_REDUCE"
    [ncclcb]="--xla_gpu_experimental_use_collective_kernels=-ALL_REDUCE --xla_gpu_enable_command_buffer=+COLLECTIVES"
    [ncclcb_skiptemp]="--xla_gpu_experimental_use_collective_kernels=-ALL_REDUCE --xla_gpu_enable_command_buffer=+COLLECTIVES --xla_gpu_command_buffer_update_mode=SKIP_TEMP"
  )
  FLAGS[default]=""
  FLAGS[ncclcb_ll]=${FLAGS[ncclcb]}; FLAGS[ncclcb_ll128]=${FLAGS[ncclcb]}
  declare -A ENVS=([ncclcb_ll]="NCCL_PROTO=LL" [ncclcb_ll128]="NCCL_PROTO=LL,LL128")
  # Suffixes (session 6), tried against XLA's CUDA-graph updates (the temp buffer's address
  # alternates between steps in flight): <set>_x2 compiles each step program twice and alternates
  # the copies (--program-copies 2); <set>_async uses jax's stream-ordered allocator
  # (XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async).
  for name in ${SETS:-oneshot both cbcoll}; do
    base=$name; copies=(); alloc=()
    [ "${base%_x2}" != "$base" ] && base=${base%_x2} && copies=(--program-copies 2)
    [ "${base%_async}" != "$base" ] && base=${base%_async} && alloc=(XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async)
    sizes=${TPS#1 }; [ "$base" = default ] || [ "$base" = shipped ] && sizes=$TPS
    if [ "$base" = shipped ]; then pre=(env -u XLA_FLAGS -u NCCL_PROTO -u XLASERVE_NO_DEFAULT_XLA_FLAGS "${alloc[@]}")
    else pre=(env -u NCCL_PROTO XLASERVE_NO_DEFAULT_XLA_FLAGS=1 XLA_FLAGS="$BASE ${FLAGS[$base]}"
              ${ENVS[$base]:-} "${alloc[@]}"); fi
    "${pre[@]}" timeout -s ABRT -k 5 "${SET_S:-170}" $PY bench/tp_scaling.py \
      --tp $sizes --decode-batches 1 --greedy-steps 4 --repeats 3 ${SET_ARGS:-} "${copies[@]}" --trace-dir "/tmp/tr_$name" \
      --out "$R/tp_$name.json" 2>&1 | tee "$R/tp_$name.log" | grep -v "^ \|^--\|^{\|^}"
    echo "=== $name rc=$? at $((SECONDS - T0))s"
  done
fi
$PY - "$R" <<'PY'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("tp_*.json")):
    d = json.loads(f.read_text())
    for x in d["results"]:
        dec = x["decode"]["1"]
        fam = {}
        for t in dec.get("trace", {}).get("threads", []):
            if t["device"] and t["busy_us_per_step"] > 500:
                fam = {k: round(v) for k, v in t["families_us_per_step"].items()}
                fam["busy"] = round(t["busy_us_per_step"]); fam["span"] = round(t["span_us_per_step"])
                break
        upd = []  # per XLA execute thread: (busy, graph update us, updates) per step
        for t in dec.get("trace", {}).get("threads", []):
            if t["thread"].startswith("py_xla_execute") or "ExecuteThunks" in str(t.get("top")):
                top = {e["name"]: e for e in t["top"]}
                u = top.get("command_buffer::update", {})
                upd.append((round(t["busy_us_per_step"]), round(u.get("us_per_step", 0)),
                            u.get("calls_per_step", 0)))
        print(f.name, "tp", x["tp"], "decode_b1_ms", dec["step_ms"], "per_dev", dec["per_device_ms"],
              "prefill_ms", x.get("prefill", {}).get("step_ms"), "greedy", x["greedy_tokens"][:5], fam,
              "host busy/update us/updates per step", upd)
PY
tar czf "$OUT/tp$PART.tgz" -C "$OUT" "tp$PART"
