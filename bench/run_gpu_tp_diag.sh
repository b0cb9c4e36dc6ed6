#!/usr/bin/env bash
# Diagnose a tp>1 stall at "building and compiling" (2 GPUs): a bare psum, the tiny model through
# the CLI, then the 8B tp=2 step, each under a timeout that aborts with Python tracebacks
# (faulthandler on SIGABRT) and NCCL's INFO log.   OUT=/tmp/out bash bench/run_gpu_tp_diag.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,P2P,SHM,NET,ENV
R=${OUT:?set OUT}/tpd
PY=${PYTHON:-python3}
mkdir -p "$R"
source bench/gpu_install.sh && gpu_install || exit 1
T0=$SECONDS
timeout -s ABRT -k 5 45 $PY - > "$R/psum.log" 2>&1 <<'PY'
import time, xlaserve, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
print("devices", jax.devices(), flush=True)
mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
f = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "model"), mesh=mesh, in_specs=P("model"),
                          out_specs=P()))
x = jnp.arange(2 * 4096, dtype=jnp.float32)
t = time.time(); print("psum", f(x).block_until_ready()[:4], time.time() - t, flush=True)
t = time.time(); [f(x) for _ in range(100)][-1].block_until_ready(); print("100 psum s", time.time() - t)
PY
echo "=== psum rc=$? at $((SECONDS - T0))s"; tail -5 "$R/psum.log"
timeout -s ABRT -k 5 60 $PY -m xlaserve generate --model builtin:tiny --dtype float32 \
  --tensor-parallel-size 2 --prompt "The quick brown fox" --max-tokens 8 --temperature 0 --json \
  > "$R/tiny_tp2.log" 2>&1
echo "=== tiny tp2 rc=$? at $((SECONDS - T0))s"; tail -3 "$R/tiny_tp2.log"
timeout -s ABRT -k 5 ${TP_S:-120} $PY bench/tp_scaling.py --tp 2 --decode-batches 1 --greedy-steps 2 \
  --out "$R/tp2.json" > "$R/tp2.log" 2>&1
echo "=== 8B tp2 rc=$? at $((SECONDS - T0))s"; grep -v "NCCL INFO" "$R/tp2.log" | tail -40
grep -c "NCCL INFO" "$R/tp2.log"; grep "NCCL INFO" "$R/tp2.log" | tail -15
tar czf "$OUT/tpd.tgz" -C "$OUT" tpd
