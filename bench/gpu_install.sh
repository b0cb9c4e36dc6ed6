# Sourced by the bench/run_gpu_*.sh scripts (repo root, $PY set).
#   gpu_session DIR [LOG] [NOTE]  makes DIR, copies everything the script prints into DIR/LOG
#                                 (default session.log), prints the date and commit (+ NOTE);
#                                 COMMIT=<hash> overrides the device checkout's (maybe stale) HEAD
#   gpu_install                   installs xlaserve editable on the GPU machine; returns 1 when
#                                 the install fails. A carried .whl/ (setuptools + wheel) comes
#                                 first when the machine's setuptools is too old for editable
#                                 installs with package-dir mappings.
gpu_session() {
  mkdir -p "$1"
  exec > >(tee -a "$1/${2:-session.log}") 2>&1
  # The device's checkout carries the working tree but may keep a stale .git: pass the commit the
  # tree came from as COMMIT=... in the command when it matters (session 5's logs show the stale one).
  echo "date $(date -u +%FT%TZ) commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null) (device checkout HEAD)}${3:+ $3}"
}
# gpu_start DIR NOTE: what every bench/run_gpu_*.sh does first (repo root, PY set): the run
# environment, gpu_session DIR session.log NOTE, gpu_install, the GPUs' names, and T0 (the
# script's start, for run_tp). Returns 1 when the install fails.
gpu_start() {
  export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0
  gpu_session "$1" session.log "$2" && gpu_install || return 1
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  T0=$SECONDS
}
# gpu_script SESSION DEFAULT_PART: the start of a bench/run_gpu_sNN.sh script (repo root): PART
# (default DEFAULT_PART), R=$OUT/sSESSION_$PART, PY (default python3), then gpu_start.
gpu_script() {
  PART=${PART:-$2}
  R=${OUT:?set OUT}/s$1_$PART
  PY=${PYTHON:-python3}
  gpu_start "$R" "session $1 part $PART"
}
gpu_install() {
  if ls .whl/setuptools-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps .whl/setuptools-*.whl .whl/wheel-*.whl
  fi
  $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
}
# gpu_cli_tp_check DIR: the builtin model through `xlaserve generate` at tp 1 and 2 (4 greedy
# prompts); logs in DIR, and one line "CLI greedy token ids tp2 == tp1: True|False ..." printed
# and written to DIR/cli.txt.
gpu_cli_tp_check() {
  $PY - > /tmp/in.jsonl <<'PY'
import json
for i, p in enumerate(["Hello, my name is", "The capital of France", "1 2 3 4", "Once upon a time"]):
    print(json.dumps({"id": f"p{i}", "prompt": p, "max_tokens": 24, "temperature": 0}))
PY
  for tp in 1 2; do
    timeout -s ABRT -k 5 120 $PY -m xlaserve generate --model builtin:tiny --dtype float32 \
      --tensor-parallel-size $tp --input /tmp/in.jsonl --output "/tmp/cli_tp$tp.jsonl" \
      > "$1/cli_tp$tp.log" 2>&1
    echo "=== cli tp$tp rc=$?"
  done
  $PY - <<'PY' | tee "$1/cli.txt"
import json
t = {tp: {json.loads(l)["id"]: json.loads(l)["token_ids"] for l in open(f"/tmp/cli_tp{tp}.jsonl")} for tp in (1, 2)}
print("CLI greedy token ids tp2 == tp1:", t[1] == t[2], "prompts", len(t[1]))
PY
}
# gpu_cli_gemm_check DIR: the builtin model through the engine at tp 2 with --decode-gemm xla
# and pallas (4 greedy prompts); logs in DIR, and one line "CLI tp2 greedy token ids,
# decode_gemm pallas == xla: True|False ..." printed and written to DIR/cli.txt.
gpu_cli_gemm_check() {
  $PY - > /tmp/in.jsonl <<'PY'
import json
for i, p in enumerate(["Hello, my name is", "The capital of France", "1 2 3 4", "Once upon a time"]):
    print(json.dumps({"id": f"p{i}", "prompt": p, "max_tokens": 24, "temperature": 0}))
PY
  for mode in xla pallas; do
    timeout -s ABRT -k 5 150 $PY -m xlaserve --log-level INFO generate --model builtin:tiny \
      --dtype float32 --tensor-parallel-size 2 --decode-gemm $mode --input /tmp/in.jsonl \
      --output "/tmp/cli_$mode.jsonl" > "$1/cli_$mode.log" 2>&1
    echo "=== cli $mode rc=$?"
  done
  $PY - <<'PY' | tee "$1/cli.txt"
import json
t = {m: {json.loads(l)["id"]: json.loads(l)["token_ids"] for l in open(f"/tmp/cli_{m}.jsonl")}
     for m in ("xla", "pallas")}
print("CLI tp2 greedy token ids, decode_gemm pallas == xla:", t["xla"] == t["pallas"],
      "prompts", len(t["xla"]))
PY
}
# trace_render FILE [TOP]: the per-step trace summaries (bench/trace_summary.render) of a
# tp_scaling JSON's traced decode runs (B=1), one per tp.
trace_render() {
  $PY - "$1" "${2:-14}" <<'PY'
import json, sys
sys.path.insert(0, "bench")
import trace_summary
for r in json.load(open(sys.argv[1]))["results"]:
    if r["decode"]["1"].get("trace"):
        print("tp", r["tp"], trace_summary.render(r["decode"]["1"]["trace"], top=int(sys.argv[2])))
PY
}
# run_tp NAME TPS [extra...]: bench/tp_scaling.py --tp TPS with the batch-1 decode settings of
# sessions 13-15 (TPS_ARGS overrides them) and the extra arguments, its JSON and log in $R, one
# line per tp printed. Needs R, PY and T0 (the script's start, $SECONDS) set; TBL=path runs it
# with that skinny GEMM table (XLASERVE_SKINNY_GEMM_TABLE), ATBL=path with that attention tile
# table (XLASERVE_ATTENTION_TABLE), EL=0|1 with XLASERVE_EARLY_LAUNCH (pallas_kernels/pdl.py),
# XENV="NAME=VALUE ..." with those variables. Where nvidia-smi exists, the GPUs' SM clock,
# temperature, power and throttle reasons are sampled during the run into $R/NAME.clocks.csv
# and summarized after it (clocks_summary): whether a host's spread comes from its clocks.
run_tp() {
  local name=$1 tps=$2 rc sampler=; shift 2
  local args=("${TPS_ARGS[@]:---decode-batches 1 --all-reduce custom --no-prefill --greedy-steps 4 --child-timeout 200}")
  if command -v nvidia-smi >/dev/null; then  # the GPUs' clocks, temperature and power, 4 Hz
    nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active \
      --format=csv,noheader -lms 250 > "$R/$name.clocks.csv" 2>/dev/null &
    sampler=$!
  fi
  timeout -s ABRT -k 5 420 env ${TBL:+XLASERVE_SKINNY_GEMM_TABLE=$TBL} \
    ${ATBL:+XLASERVE_ATTENTION_TABLE=$ATBL} ${EL:+XLASERVE_EARLY_LAUNCH=$EL} ${XENV:-} \
    $PY bench/tp_scaling.py --tp $tps ${args[@]} "$@" --out "$R/$name.json" \
    > "$R/$name.log" 2>&1
  rc=$?
  if [ -n "$sampler" ]; then kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null; fi
  echo "=== $name rc=$rc at $((SECONDS - T0))s"; grep -E "decode B=1" "$R/$name.log" | head -4
  if [ -n "$sampler" ]; then clocks_summary "$R/$name.clocks.csv"; fi
}
# clocks_summary FILE: one line per GPU from run_tp's nvidia-smi samples: the SM clock's range
# and median (MHz) over the samples where it ran above 1000 MHz (the run's busy part), the top
# temperature and power, and the throttle-reason masks seen.
clocks_summary() {
  $PY - "$1" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = [x.strip() for x in line.split(",")]
    if len(f) >= 7 and f[2].split()[0].isdigit() and int(f[2].split()[0]) > 1000:
        runs[f[1]].append((int(f[2].split()[0]), float(f[4]), float(f[5].split()[0]), f[6]))
for gpu, s in sorted(runs.items()):
    sm = [x[0] for x in s]
    print(f"  gpu {gpu}: SM {min(sm)}-{max(sm)} MHz (median {statistics.median(sm):.0f}, "
          f"{len(s)} samples), max {max(x[1] for x in s):.0f} C, {max(x[2] for x in s):.0f} W, "
          f"throttle {' '.join(sorted({x[3] for x in s}))}")
PY
}
# gpu_tests FILE...: the compiled (not interpreted) tests of FILEs (GPU_TESTS_K: a pytest -k
# expression instead of "not Interpret"), GPU_TESTS_TIMEOUT s at most (default 120).
gpu_tests() {
  JAX_PLATFORMS=cuda timeout -s ABRT -k 5 ${GPU_TESTS_TIMEOUT:-120} $PY -m pytest -q -rfs --tb=short \
    -k "${GPU_TESTS_K:-not Interpret}" -p no:cacheprovider "$@" > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -3 "$R/pytest_gpu.txt"
}
# run_variants RUNS STOP: runs named <variant>_<tp>[b][_t] ($RUNS overrides), each with
# EL=$(el_of variant), ATBL=$(at_of variant), XENV=$(env_of variant) and the extra tp_scaling
# arguments $(args_of variant) (functions of the part); _t runs are traced. Runs that would
# start after STOP s ($STOP_AT) are skipped; pack_results after each run. The part defines
# el_of, at_of, env_of and args_of (empty: defaults).
run_variants() {
  for r in ${RUNS:-$1}; do
    if [ $((SECONDS - T0)) -gt ${STOP_AT:-$2} ]; then echo "=== $r skipped (time)"; continue; fi
    local v=${r%%_*} tp=${r#*_}; tp=${tp:0:1}
    local extra=(--slope-iters ${SLOPE:-80} $(args_of $v))
    [ "${r: -2}" = _t ] && extra=(--trace-dir /tmp/tr_$r --trace-steps 4 $(args_of $v))
    XENV=$(env_of $v) ATBL=$(at_of $v) EL=$(el_of $v) run_tp $r $tp "${extra[@]}"
    grep -o '"greedy_tokens": \[[0-9, ]*\]' "$R/$r.json" | head -2
    [ "${r: -2}" = _t ] && trace_render "$R/$r.json" 12 | head -60
    pack_results  # after every run: a call cut by its time limit still brings these back
  done
}
# pack_results: $R as one tarball in $OUT (a device call brings back only a few files).
pack_results() {
  tar czf "$OUT/$(basename "$R").tgz" -C "$OUT" "$(basename "$R")" 2>/dev/null
}
el_of() { :; }
at_of() { :; }
env_of() { :; }
args_of() { :; }
