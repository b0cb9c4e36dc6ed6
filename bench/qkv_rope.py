"""q/k/v of a batch-1 decode step in isolation: the split-K skinny GEMM + rope_write_kv (the
model's path) against skinny_gemm_rope (one kernel, pallas_kernels/skinny_gemm_rope.py) over a
few tiles, at the 8B shapes of tp 1 and 2.

Each variant runs as one program of `--layers` layers, each with its own weights and pools (so
the weights stream from HBM, as in the model: 25 MB per layer at tp 2, 50 MB at tp 1), one token
row of a 16-row bucket; the time per layer is the program's median over repeats divided by the
layers. Every variant's q and pools are compared with the first's (bf16 tolerance).

    python bench/qkv_rope.py --out /tmp/qkv_rope.json [--tp 1 2] [--layers 32]
    (CPU smoke: --interpret --small)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import common
import jax
import jax.numpy as jnp
import numpy as np
from xlaserve.pallas_kernels.rope_write_kv import rope_write_kv
from xlaserve.pallas_kernels.skinny_gemm import SkinnyGemmConfig, skinny_gemm
from xlaserve.pallas_kernels.skinny_gemm_rope import skinny_gemm_rope

H, NQ, NKV, HD = 4096, 32, 8, 128  # Llama 3.1 8B
SPLIT_K = {1: SkinnyGemmConfig(block_n=64, block_k=128, num_splits=4),  # the measured table's
           2: SkinnyGemmConfig(block_n=32, block_k=128, num_splits=4)}  # qkv_tp1 / qkv_tp2
# (hb, block_k, num_warps, num_stages). hb 16 reads 32-byte row segments of the weight, two
# programs per 64 bytes (DRAM may fetch each twice); hb 32 gives half the programs (48 at tp 2);
# a longer block_k keeps more bytes in flight per program (one program per SM at tp 2); stages
# x (x tile + two weight tiles) stay within 227 KiB of shared memory.
FUSED = [(16, 128, 4, 4), (16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 512, 4, 2),
         (16, 256, 8, 4)]


def layer_inputs(tp: int, layers: int, small: bool) -> dict[str, Any]:
    hidden, nq, nkv, hd = (256, 8, 2, 64) if small else (H, NQ // tp, NKV // tp, HD)
    key = jax.random.key(0)
    bf = jnp.bfloat16
    w = lambda i, n: (jax.random.normal(jax.random.fold_in(key, i), (layers, hidden, n))  # noqa: E731
                      / np.sqrt(hidden)).astype(bf)
    pages, page = 8, 16  # small pools: the per-layer slices XLA copies for the aliasing
    return {"x": jax.random.normal(key, (16, hidden)).astype(bf),
            "wq": w(1, nq * hd), "wk": w(2, nkv * hd), "wv": w(3, nkv * hd),
            "cos": jnp.ones((16, hd // 2), jnp.float32) * 0.6,
            "sin": jnp.ones((16, hd // 2), jnp.float32) * 0.8,
            "slots": jnp.arange(16, dtype=jnp.int32) * 17 % (pages * page),
            "rows": jnp.array([1], jnp.int32),
            "kp": jnp.zeros((layers, nkv, pages, page, hd), bf),
            "vp": jnp.zeros((layers, nkv, pages, page, hd), bf), "nq": nq}


def program(variant: Any, nq: int, interpret: bool, split_k: SkinnyGemmConfig):
    """A jitted function of the inputs: every layer's q/k/v (x shared), stacked."""
    def fn(x, wq, wk, wv, cos, sin, slots, rows, kp, vp):
        qs, kps, vps = [], [], []
        for i in range(wq.shape[0]):
            if variant == "split_k":
                parts = skinny_gemm(x, (wq[i], wk[i], wv[i]), config=split_k,
                                    interpret=interpret)
                q, k1, v1 = rope_write_kv(parts, cos, sin, slots, kp[i], vp[i], rows,
                                          num_q_heads=nq, dtype=jnp.bfloat16,
                                          interpret=interpret)
            else:
                q, k1, v1 = skinny_gemm_rope(x, wq[i], wk[i], wv[i], cos, sin, slots, kp[i],
                                             vp[i], rows, config=variant, interpret=interpret)
            qs.append(q)
            kps.append(k1)
            vps.append(v1)
        return jnp.stack(qs), jnp.stack(kps), jnp.stack(vps)
    return jax.jit(fn)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, nargs="+", default=[2, 1])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke)")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    report: dict[str, Any] = {"bench": "qkv_rope", **common.device_info(),
                              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "layers": args.layers, "results": []}
    for tp in args.tp:
        inp = layer_inputs(tp, args.layers, args.small)
        nq = inp.pop("nq")
        split_k = (SkinnyGemmConfig(block_n=32, block_k=64, num_splits=4) if args.small
                   else SPLIT_K[tp])
        variants: list[Any] = ["split_k"] + [
            SkinnyGemmConfig(block_n=hb, block_k=bk, num_splits=1, num_warps=w, num_stages=s)
            for hb, bk, w, s in ([(16, 64, 4, 2)] if args.small else FUSED)]
        first = None
        for v in variants:
            name = v if isinstance(v, str) else f"fused hb{v.block_n} bk{v.block_k} " \
                                                f"w{v.num_warps} s{v.num_stages}"
            fn = program(v, nq, args.interpret, split_k)
            try:
                out = fn(**inp)
            except Exception as e:  # noqa: BLE001  (a tile that does not compile: record, go on)
                report["results"].append({"tp": tp, "variant": name, "error": str(e)[:500]})
                print(f"tp={tp} {name:28s} failed: {str(e)[:200]}", flush=True)
                continue
            if first is None:
                first = out
            err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                      for a, b in zip(out, first))
            sec = common.time_fn(fn, *inp.values(), iters=1, repeats=args.repeats)
            row = {"tp": tp, "variant": name, "us_per_layer": sec / args.layers * 1e6,
                   "max_abs_diff_vs_first": err}
            report["results"].append(row)
            print(f"tp={tp} {name:28s} {row['us_per_layer']:8.2f} us/layer  "
                  f"max|diff| {err:.3g}", flush=True)
            if err > 0.05:
                print(f"  ! {name} differs from {variants[0]}", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
