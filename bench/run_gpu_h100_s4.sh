#!/usr/bin/env bash
# H100 calls of session 4, one lease:
#   PART=main   batch-1 decode at ctx 1024 (max_model_len 8224), K/V written by XLA's scatter (the
#               default below 1024 tokens) vs the Pallas write kernel at every step size, A/B/A/B;
#               then the transformers peer with static cache + torch.compile, warmed up with the
#               timed output length (session 3's 1x1024 case recompiled during the timed run).
#   PART=stash  keeps a carried part of the jax 0.10.2 wheels (.jN/) in /tmp/jparts.
#   PART=j0102  joins the parts (jax, jaxlib, CUDA plugin 0.10.2, unpacked: 150 MB as tar.xz,
#               more than one call may carry), and runs the compiled kernel tests and the builtin
#               model's greedy tokens (Pallas vs reference attention) under jax 0.10.2.
#   PART=main OUT=/tmp/out bash bench/run_gpu_h100_s4.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
R=${OUT:?set OUT}/s4${PART:?set PART}
PY=${PYTHON:-python3}
MODEL=bench/configs/llama3.1-8b
mkdir -p /tmp/jparts
source bench/gpu_install.sh && gpu_session "$R" session.log "part $PART"
for d in .j1 .j2 .j3; do [ -d $d ] && cp $d/* /tmp/jparts/; done; ls -la /tmp/jparts
T0=$SECONDS
case $PART in
main)
  gpu_install || exit 1
  for rep in 1 2; do
    for w in xla pallas; do
      extra=""; [ $w = pallas ] && extra="--kv-write-min-tokens 1"
      timeout -k 5 "${LAT_S:-80}" $PY bench/latency.py --model $MODEL --load-format dummy \
        --contexts 1024 --decode-tokens 64 --repeats 2 --max-model-len 8224 $extra \
        --out "$R/latency_1k_write_${w}_$rep.json" | tail -3
      echo "=== latency write=$w rep=$rep rc=$? at $((SECONDS - T0))s"
    done
  done
  timeout -k 5 "${PEER_S:-300}" $PY bench/peers.py --config $MODEL --modes static_compile \
    --cases 1x1024x64 32x128x128 --out "$R/peers_static_compile.json"
  echo "=== peers rc=$? at $((SECONDS - T0))s"
  ;;
stash) ;;
j0102)
  rm -rf /tmp/j0102site && mkdir -p /tmp/j0102site
  cat /tmp/jparts/j0102.part* | xz -d | tar x -C /tmp/j0102site || exit 1
  gpu_install || exit 1
  export PYTHONPATH=/tmp/j0102site
  $PY -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
  timeout -k 5 "${TEST_S:-240}" $PY -m pytest -q -p no:cacheprovider \
    tests/kernels/test_ragged_paged_attention.py -k "not Interpret" 2>&1 | tail -15
  echo "=== kernel tests (jax 0.10.2, compiled) rc=$? at $((SECONDS - T0))s"
  for impl in pallas_triton reference; do
    timeout -k 5 120 $PY -m xlaserve generate --model builtin:tiny --dtype float32 \
      --attention-impl $impl --prompt "The quick brown fox" --max-tokens 32 --temperature 0 \
      --json > "$R/greedy_$impl.json" 2> "$R/greedy_$impl.log"
    echo "=== greedy $impl rc=$? at $((SECONDS - T0))s"; grep -i "chose\|jax" "$R/greedy_$impl.log" | head -3
  done
  $PY - "$R" <<'PY'
import json, sys
t = {i: json.load(open(f"{sys.argv[1]}/greedy_{i}.json"))["token_ids"] for i in ("pallas_triton", "reference")}
print("jax 0.10.2 greedy tokens pallas_triton == reference:", t["pallas_triton"] == t["reference"], t)
PY
  ;;
esac
tar czf "$OUT/s4$PART.tgz" -C "$OUT" "s4$PART"
