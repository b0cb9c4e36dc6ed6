#!/usr/bin/env bash
# The gRPC server at tp=2 on two GPUs (issue 6, "the server works unchanged with tp > 1"):
# `xlaserve serve --tensor-parallel-size 2` on the builtin model (float32), a greedy request through
# `xlaserve client` compared with `xlaserve generate` at tp=1, a bad request (top_p=5) that must
# come back INVALID_ARGUMENT (client exit 2) with the server still up, then a streamed request.
#   OUT=/tmp/out bash bench/run_gpu_serve_tp.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# grpc_health / grpc_reflection are not installed on the GPU machine: carried in .pydeps/.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD/.pydeps${PYTHONPATH:+:$PYTHONPATH}
R=${OUT:?set OUT}/serve_tp
PY=${PYTHON:-python3}
source bench/gpu_install.sh && gpu_session "$R" && gpu_install || exit 1
P="The quick brown fox"
T0=$SECONDS
timeout -s ABRT 150 $PY -m xlaserve generate --model builtin:tiny --dtype float32 --prompt "$P" \
  --max-tokens 32 --temperature 0 --json > "$R/generate_tp1.json" 2> "$R/generate_tp1.log"
echo "=== generate tp1 rc=$? at $((SECONDS - T0))s"
$PY -m xlaserve serve --model builtin:tiny --dtype float32 --tensor-parallel-size 2 \
  --port 50151 --metrics-port 9190 > "$R/serve.log" 2>&1 &
SERVER=$!
ok=0
for _ in $(seq 1 90); do  # until the server answers (it compiles its buckets first)
  if $PY -m xlaserve client --target 127.0.0.1:50151 --prompt "$P" --max-tokens 32 --json --timeout 60 \
      > "$R/client_tp2.txt" 2> "$R/client_tp2.err"; then ok=1; break; fi
  kill -0 $SERVER 2>/dev/null || break
  sleep 2
done
echo "=== client tp2 ok=$ok at $((SECONDS - T0))s"
$PY -m xlaserve client --target 127.0.0.1:50151 --prompt "$P" --top-p 5 --timeout 60 > "$R/bad.txt" 2> "$R/bad.err"
echo "=== bad request rc=$? (want 2): $(tail -1 "$R/bad.err")"
$PY -m xlaserve client --target 127.0.0.1:50151 --prompt "$P" --max-tokens 32 --stream --json --timeout 60 \
  > "$R/client_tp2_stream.txt" 2> "$R/client_tp2_stream.err"
echo "=== streamed request rc=$? server alive: $(kill -0 $SERVER 2>/dev/null && echo yes || echo no)"
kill -TERM $SERVER
for _ in $(seq 1 30); do kill -0 $SERVER 2>/dev/null || break; sleep 1; done
kill -0 $SERVER 2>/dev/null && { echo "=== server did not stop in 30 s: SIGKILL"; kill -9 $SERVER; }
wait $SERVER; echo "=== server exit rc=$?"
$PY - "$R" <<'PY'
import json, sys
r = sys.argv[1]
def last_json(name):
    lines = open(f"{r}/{name}").read().strip().splitlines()
    return json.loads(lines[-1])["text"] if lines else None
tp1 = json.load(open(f"{r}/generate_tp1.json"))["text"]
tp2, st = last_json("client_tp2.txt"), last_json("client_tp2_stream.txt")
print("server tp2 text == generate tp1 text:", tp2 == tp1, "| streamed == unary:", st == tp2)
print(repr(tp1[:80]), repr((tp2 or "")[:80]))
PY
grep -i "xla_gpu\|set by xlaserve\|error" "$R/serve.log" | head -5
tar czf "$OUT/serve_tp.tgz" -C "$OUT" serve_tp
