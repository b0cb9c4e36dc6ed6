"""down_proj with SwiGLU's activation: XLA's fusion + GEMM against the skinny GEMM's variants.

At batch 1 the activation silu(gate) * up is a 2 us kernel of its own before down_proj. The
skinny GEMM can compute it in its loads (`skinny_gemm(gated=True)`), but every column block of
the GEMM then recomputes it for its K slice. This times, per down_proj shape of the 8B model
(x [16, K] with one real row, weights cold: one program of n GEMMs on n weight copies):
  xla:       swiglu (XLA fusion), then jnp.dot
  split:     swiglu (XLA fusion), then the skinny GEMM (the model's path before the fold)
  gated:     the skinny GEMM computing swiglu in its loads, exp + division
  approx:    the same with tanh.approx
over a few tiles, with the relative error of each against float32.

    python bench/skinny_swiglu.py --out /tmp/swiglu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys

import common  # noqa: F401  (first: xlaserve's XLA flags)
import jax
import jax.numpy as jnp
from xlaserve.pallas_kernels.skinny_gemm import SkinnyGemmConfig, skinny_gemm, swiglu

TILES = [(64, 256, 2, 4), (64, 128, 4, 4), (128, 128, 4, 3), (128, 256, 4, 3), (256, 64, 8, 3),
         (256, 128, 8, 2)]


def run(k: int, n: int, cold_mb: float, tiles: list[tuple[int, ...]]) -> list[dict]:
    num = max(4, math.ceil(cold_mb * 2 ** 20 / (k * n * 2)))
    key = jax.random.key(0)
    row = jax.random.normal(key, (1, 2 * k), jnp.float32)
    gus = tuple(jnp.pad(row * (1 + 0.01 * i), ((0, 15), (0, 0))).astype(jnp.bfloat16)
                for i in range(num))  # one real row, 15 padding rows (zeros)
    w0 = jax.random.normal(jax.random.fold_in(key, 1), (k, n), jnp.bfloat16) * 0.02
    ws = tuple(w0 + jnp.bfloat16(i * 1e-3) for i in range(num))
    g32, u32 = gus[0][:, :k].astype(jnp.float32), gus[0][:, k:].astype(jnp.float32)
    ref = (jax.nn.silu(g32) * u32) @ ws[0].astype(jnp.float32)

    def timed(name, one, tile=None):
        fn = jax.jit(lambda gus, ws: tuple(one(gu, w) for gu, w in zip(gus, ws)))
        try:
            out = fn(gus, ws)[0]
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32)[:1] - ref[:1]))
                        / jnp.max(jnp.abs(ref[:1])))
            us = common.time_fn(fn, gus, ws, iters=10, repeats=5, warmup=1) / num * 1e6
            row = {"k": k, "n": n, "variant": name, "tile": tile, "us": round(us, 2),
                   "rel_err": err}
        except Exception as e:  # noqa: BLE001  (a tile that fails is reported)
            row = {"k": k, "n": n, "variant": name, "tile": tile, "error": str(e)[:200]}
        print(json.dumps(row), flush=True)
        return row

    rows = [timed("xla", lambda gu, w: jnp.dot(swiglu(gu[:, :k], gu[:, k:]), w,
                                                preferred_element_type=jnp.float32))]
    for bn, bk, sp, st in tiles:
        cfg = SkinnyGemmConfig(block_n=bn, block_k=bk, num_splits=sp, num_stages=st)
        if cfg.fits(k, (n,)):
            continue
        t = [bn, bk, sp, st]
        rows.append(timed("split", lambda gu, w, c=cfg: skinny_gemm(
            swiglu(gu[:, :k], gu[:, k:]), (w,), config=c).sum(0), t))
        rows.append(timed("gated", lambda gu, w, c=cfg: skinny_gemm(
            gu, (w,), config=c, gated=True).sum(0), t))
        rows.append(timed("approx", lambda gu, w, c=cfg: skinny_gemm(
            gu, (w,), config=c, gated=True, approx=True).sum(0), t))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=[7168, 14336])
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--cold-mb", type=float, default=320)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    rows = [r for k in a.k for r in run(k, a.n, a.cold_mb, TILES)]
    rep = {"bench": "skinny_swiglu", "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, "date": datetime.datetime.now(datetime.timezone.utc)
           .isoformat(timespec="seconds"), "command": " ".join(["python", *sys.argv]),
           "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rep, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
