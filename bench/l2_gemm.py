"""The skinny GEMM with its weight cold (in HBM) or hot (in L2): how much of a batch-1 decode
GEMM's time the weight's HBM reads are, at the 8B tp=2 o_proj and q/k/v shapes.

Each program runs `--layers` GEMMs one after the other, each x the previous GEMM's output
(a chain, so XLA cannot merge the calls): "cold" with a distinct weight per call (8 x 16.8 MB
for o_proj: more than L2 holds), "hot" with the same weight every call (in L2 after the
first). The table's tiles (ops.skinny_gemm_config). Time per GEMM = the program's median / the
calls; each includes the chain's small cast fusion (the same in both).

    python bench/l2_gemm.py --out /tmp/l2_gemm.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from typing import Any

import common
import jax
import jax.numpy as jnp
from xlaserve.pallas_kernels import ops
from xlaserve.pallas_kernels.skinny_gemm import skinny_gemm

def chain(x: jax.Array, weights: list[list[jax.Array]], *, cfg: Any, interpret: bool,
          ) -> jax.Array:
    """x through one GEMM per weight list, each output cast back to x's shape (a chain)."""
    k = x.shape[1]
    for w in weights:
        y = skinny_gemm(x, w, config=cfg, interpret=interpret).sum(0)  # [16, sum N]
        x = jnp.tile(y, (1, -(-k // y.shape[1])))[:, :k].astype(jnp.bfloat16)
    return x


SHAPES = {"o_tp2": (2048, (4096,)), "qkv_tp2": (4096, (2048, 512, 512)),
          "o_tp1": (4096, (4096,))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    report: dict[str, Any] = {"bench": "l2_gemm", **common.device_info(),
                              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "layers": args.layers, "results": []}
    key = jax.random.key(0)
    for name, (k, ns) in SHAPES.items():
        cfg = ops.skinny_gemm_config(16, k, ns, jnp.bfloat16,
                                     "pallas_interpret" if args.interpret else "pallas")
        assert cfg is not None
        x = jax.random.normal(key, (16, k)).astype(jnp.bfloat16)
        ws = [[(jax.random.normal(jax.random.fold_in(key, 10 * i + j), (k, n)) / 64)
               .astype(jnp.bfloat16) for j, n in enumerate(ns)] for i in range(args.layers)]

        for mode in ("cold", "hot"):
            weights = ws if mode == "cold" else [ws[0]] * args.layers
            fn = jax.jit(functools.partial(chain, cfg=cfg, interpret=args.interpret))
            fn(x, weights).block_until_ready()
            sec = common.time_fn(fn, x, weights, iters=1, repeats=args.repeats)
            mb = k * sum(ns) * 2 / 1e6
            row = {"shape": name, "mode": mode, "config": str(cfg), "weight_mb": mb,
                   "us_per_gemm": sec / args.layers * 1e6}
            report["results"].append(row)
            print(f"{name:8s} {mode:4s} {row['us_per_gemm']:7.2f} us/GEMM ({mb:.1f} MB, "
                  f"{mb / row['us_per_gemm']:.2f} TB/s) {cfg}", flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
