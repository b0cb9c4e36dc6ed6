#!/usr/bin/env bash
# Session 19: the type-checking pass (commit abe0bbb) touched GPU-only code paths (the fused
# all-reduce's return, ShardedRowParallel's fused branch, DecodeProjection.rope_write's
# arguments, the Attention hook flow, the Triton compiler-params lookup under jax 0.11.2). This
# checks them on two GPUs: the compiled kernel and all-reduce tests, the builtin model's greedy
# tokens at tp 2 against tp 1 through the CLI, and the 8B-shaped batch-1 decode step at tp 1 and
# 2 (tp=2 greedy equal across runs; the ratio for #6 on this machine).
#   OUT=/tmp/out COMMIT=<hash> PART=verify|verify2|hostab|skiptemp|kvdriver bash bench/run_gpu_s19.sh
set -uo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_install.sh && gpu_script 19 verify || exit 1
if [ "$PART" = verify ]; then  # call 1: cut at 600 s (the kernel tests alone took ~300 s)
  JAX_PLATFORMS=cuda timeout -s ABRT -k 5 300 $PY -m pytest -q -rfs --tb=short \
    -p no:cacheprovider tests/kernels tests/sharding/test_all_reduce.py -k "not Interpret" \
    > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -4 "$R/pytest_gpu.txt"
  gpu_cli_tp_check "$R"
  run_tp base_a "1 2"
fi
if [ "$PART" = verify2 ]; then  # call 2: what call 1 did not reach
  JAX_PLATFORMS=cuda timeout -s ABRT -k 5 240 $PY -m pytest -q -rfs --tb=short \
    -p no:cacheprovider tests/sharding/test_all_reduce.py > "$R/pytest_gpu.txt" 2>&1
  echo "=== pytest rc=$? at $((SECONDS - T0))s"; tail -4 "$R/pytest_gpu.txt"
  run_tp base_b 2
  if [ $((SECONDS - T0)) -lt 420 ]; then
    run_tp base_c 1
  fi
fi
if [ "$PART" = hostab ]; then  # call 3: call 2's host was slow (tp=2 dispatch 3.40 ms)
  # the previous commit's library (61f2d6c) against this one, and XLA's SKIP_TEMP graph
  # update mode (no command-buffer updates for the moving temp buffer; less host time)
  P=bench/results/session19_h200x2/to_61f2d6c.patch
  SKIP=--xla-flags=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
  run_tp new_a 2
  run_tp skip_a 2 $SKIP
  git apply $P && echo "=== applied $P (61f2d6c's library)"
  run_tp old_a 2
  git apply -R $P && echo "=== reverted $P"
  if [ $((SECONDS - T0)) -lt 420 ]; then
    run_tp skip1 1 $SKIP
  fi
  if [ $((SECONDS - T0)) -lt 440 ]; then
    run_tp new_b 2
  fi
fi
if [ "$PART" = skiptemp ]; then  # call 4, one H200: SKIP_TEMP through the engine
  # Batch-1 latency and offline throughput of the 8B shape, and the builtin model's greedy
  # tokens, with XLA's defaults and with SKIP_TEMP (XLA's client then uses its VMM allocator):
  # host time, device-idle, tokens/s, and the KV pages the engine sizes from memory_stats().
  M=bench/configs/llama3.1-8b
  SK=XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP
  e2e() {  # name timeout script args... (env assignments may precede: env runs them)
    local name=$1 limit=$2; shift 2
    timeout -s ABRT -k 5 $limit env "$@" --out "$R/$name.json" > "$R/$name.log" 2>&1
    echo "=== $name rc=$? at $((SECONDS - T0))s"
  }
  LAT=(bench/latency.py --model $M --load-format dummy --contexts 128,1024 --decode-tokens 32
       --repeats 2)
  THR=(bench/throughput.py --model $M --load-format dummy --cases 128/128:256
       --max-num-seqs 256 --max-num-batched-tokens 2048)
  e2e lat_base 200 $PY "${LAT[@]}"
  e2e lat_skip 200 $SK $PY "${LAT[@]}"
  e2e thr_base 220 $PY "${THR[@]}"
  e2e thr_skip 220 $SK $PY "${THR[@]}"
  $PY -c 'import json
for i, p in enumerate(["Hello, my name is", "The capital of France", "1 2 3 4", "Once upon"]):
    print(json.dumps({"id": f"p{i}", "prompt": p, "max_tokens": 24, "temperature": 0}))' \
    > /tmp/in.jsonl
  for v in base skip; do
    timeout -s ABRT -k 5 120 env $([ $v = skip ] && echo $SK) $PY -m xlaserve generate \
      --model builtin:tiny --dtype float32 --input /tmp/in.jsonl --output /tmp/cli_$v.jsonl \
      > "$R/cli_$v.log" 2>&1
    echo "=== cli_$v rc=$?"
  done
  $PY -c 'import json
t = {v: [json.loads(l)["token_ids"] for l in open(f"/tmp/cli_{v}.jsonl")] for v in ("base", "skip")}
print("CLI greedy token ids, SKIP_TEMP == default:", t["base"] == t["skip"], len(t["base"]))' \
    | tee "$R/cli.txt"
  $PY - "$R" <<'PY'
import json, sys, pathlib
r = pathlib.Path(sys.argv[1])
for name in ("lat_base", "lat_skip", "thr_base", "thr_skip"):
    f = r / f"{name}.json"
    if not f.exists():
        print(name, "missing"); continue
    d = json.loads(f.read_text())
    eng = d.get("engine", {})
    print(name, "num_pages", eng.get("num_pages"), "XLA_FLAGS", d.get("env", {}).get("XLA_FLAGS"))
    for c in d.get("cases", []):
        keep = {k: v for k, v in c.items() if isinstance(v, (int, float, str))}
        print("  ", json.dumps(keep)[:600])
PY
fi
if [ "$PART" = kvdriver ]; then  # call 5, one H200: KV pages from the driver's free memory
  # when XLA's allocator reports no limit: SKIP_TEMP (XLA then uses its VMM allocator) and
  # XLA_PYTHON_CLIENT_ALLOCATOR=platform, through offline throughput (call 4: 512 pages and
  # 3062 tokens/s under SKIP_TEMP; 40657 pages and 11560 tokens/s with the defaults).
  THR=(bench/throughput.py --model bench/configs/llama3.1-8b --load-format dummy
       --cases 128/128:256 --max-num-seqs 256 --max-num-batched-tokens 2048)
  for v in skip platform; do
    case $v in
      skip) E=XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP ;;
      platform) E=XLA_PYTHON_CLIENT_ALLOCATOR=platform ;;
    esac
    timeout -s ABRT -k 5 220 env $E $PY "${THR[@]}" --out "$R/thr_$v.json" \
      > "$R/thr_$v.log" 2>&1
    echo "=== thr_$v rc=$? at $((SECONDS - T0))s"
    $PY -c 'import json, sys
d = json.load(open(sys.argv[1])); c = d["cases"][0]
print(sys.argv[1].split("/")[-1], "num_pages", d["engine"]["num_pages"], "tok/s",
      round(c["output_tokens_per_s"]), "preemptions", c["preemptions"])' "$R/thr_$v.json"
  done
fi
tar czf "$OUT/s19_$PART.tgz" -C "$OUT" "s19_$PART" && rm -rf "$R"
