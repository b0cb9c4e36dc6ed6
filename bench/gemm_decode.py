"""The decode step's skinny GEMMs ([16, K] x [K, N], bf16) with their weights streamed from HBM.

Why: the profile of session 10 found the half-width GEMMs of tp=2 (qkv [4096, 3072] 25 MB, o
[2048, 4096] 17 MB) at 2.3-2.5 TB/s, against 3.9-4.2 for the large ones. Those weights fit the
H200's L2 (50 MB); XLA's autotuner times each GEMM alone, back to back on the same weights, so it
may pick tiles that are fast only when the weights are in L2. In a decode step every weight is
read once per step, from HBM.

What it measures, per shape (the 8B model's layer GEMMs at tp 1 and 2, and the lm_head shard):
  * cold: one program of n independent GEMMs on n weight copies (n x bytes >= --cold-mb, so
    nothing stays in L2), time / n;
  * hot: the same program on one weight (dot merging off), time / n;
  * each as XLA autotunes it, and with one forced Triton tile per compile
    (``xla_gpu_override_gemm_autotuner``, per-compile options), over a small grid;
  * a Pallas (Triton) skinny GEMM prototype over its own grid (f32 split-K partials summed by XLA).
Reports us and TB/s of weight bytes, XLA's own choice, the best forced tile per shape and the best
single tile for each tp's four layer shapes.

    python bench/gemm_decode.py --out /tmp/gemm_decode.json [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
import time
from typing import Any

import common  # noqa: F401  (first: xlaserve's XLA flags)
import jax
import jax.numpy as jnp
from xlaserve.pallas_kernels.skinny_gemm import SkinnyGemmConfig, skinny_gemm

H, NQ, NKV, HD, INTER, VOCAB = 4096, 32, 8, 128, 14336, 128256  # Llama 3.1 8B


def shapes(tps: list[int]) -> list[dict[str, Any]]:
    out = []
    for tp in tps:
        for name, k, ns, m in (("qkv", H, (NQ * HD // tp, NKV * HD // tp, NKV * HD // tp), 16),
                               ("o", NQ * HD // tp, (H,), 16),
                               ("gate_up", H, (2 * INTER // tp,), 16),
                               ("down", INTER // tp, (H,), 16),
                               ("lm_head", H, (VOCAB // tp,), 8)):
            # ns: the widths of the weights one launch reads (q, k, v: three, side by side)
            out.append({"name": f"{name}_tp{tp}", "tp": tp, "m": m, "k": k, "n": sum(ns),
                        "ns": list(ns), "layer": name != "lm_head"})
    return out


def tile_text(bm: int, bn: int, bk: int, split: int, stages: int, warps: int) -> str:
    return (f"block_m: {bm} block_n: {bn} block_k: {bk} split_k: {split} "
            f"num_stages: {stages} num_warps: {warps} num_ctas: 1")


def candidate_tiles(m: int, k: int, n: int, quick: bool) -> list[tuple[int, ...]]:
    """(bm, bn, bk, split, stages, warps) with about 1-8 CTAs per SM of an H100/H200."""
    out = []
    bns = (32, 64, 128) if not quick else (64, 128)
    for bn, bk, split in itertools.product(bns, (128, 256), (1, 2, 4, 8, 16)):
        ctas = (n // bn) * split
        if n % bn or k % (split * bk) or not 120 <= ctas <= 1100:
            continue
        for stages in ((3, 4) if not quick else (4,)):
            out.append((16, bn, bk, split, stages, 4))
    return out


def chain(num: int):
    def fn(xs, ws):
        return tuple(jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
                     for x, w in zip(xs, ws))
    return fn


# XLA's tile in the optimized HLO: "triton_gemm_config" (legacy GEMM fusions) or, for the
# nested GEMM fusions of newer XLA, "block_level_fusion_config" (output tile, warps, stages).
_XLA_TILE = re.compile(r'"(triton_gemm_config|block_level_fusion_config)":'
                       r'(\{(?:[^{}]|\{[^{}]*\})*\})')


def xla_choice(text: str) -> list[str]:
    return sorted(set(f"{m.group(1)}={m.group(2)}" for m in _XLA_TILE.finditer(text)))


# ------------------------------------------------------------------ Pallas skinny GEMM

def pallas_gemm(x: jax.Array, ws: tuple[jax.Array, ...], cfg: SkinnyGemmConfig) -> jax.Array:
    """x [M, K] @ the weights side by side, as the model runs it: the kernel's f32 partials
    summed by XLA, in x's dtype."""
    return skinny_gemm(x, ws, config=cfg).sum(axis=0).astype(x.dtype)


def pallas_tiles(m: int, k: int, ns: tuple[int, ...], quick: bool) -> list[SkinnyGemmConfig]:
    out = []
    n = sum(ns)
    for bn, bk, split, stages in itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4, 8),
                                                   (3, 4, 5)):
        ctas = (n // bn) * split
        if any(x % bn for x in ns) or k % (split * bk) or not 96 <= ctas <= 1100 \
                or k // split // bk < 2:
            continue
        if quick and (bk == 64 or stages != 4):
            continue
        out.append(SkinnyGemmConfig(block_n=bn, block_k=bk, num_splits=split, num_warps=4,
                                    num_stages=stages))
    return out


# ------------------------------------------------------------------------------------------- run

def run_shape(s: dict[str, Any], args) -> dict[str, Any]:
    m, k, n = s["m"], s["k"], s["n"]
    wbytes = k * n * 2
    num = max(4, math.ceil(args.cold_mb * 2 ** 20 / wbytes))
    key = jax.random.key(0)
    xs = tuple(jax.random.normal(jax.random.fold_in(key, i), (m, k), jnp.bfloat16)
               for i in range(num))
    w0 = jax.random.normal(jax.random.fold_in(key, 999), (k, n), jnp.bfloat16) * 0.02
    ws = tuple(w0 + jnp.bfloat16(i * 1e-3) for i in range(num))
    hot_ws = (w0,) * num
    fn = jax.jit(chain(num))
    res: dict[str, Any] = {**s, "weight_mb": wbytes / 2 ** 20, "copies": num, "forced": [],
                           "pallas": []}
    ref = jnp.dot(xs[0], ws[0], preferred_element_type=jnp.float32)

    def per_gemm(compiled, w_args):
        return common.time_fn(compiled, xs, w_args, iters=10, repeats=5, warmup=1) / num * 1e6

    comp = fn.lower(xs, ws).compile()
    res["xla_tile"] = xla_choice(comp.as_text())
    res["xla_cold_us"] = per_gemm(comp, ws)
    hot = fn.lower(xs, hot_ws).compile(
        compiler_options={"xla_gpu_dot_merger_threshold_mb": "0"})
    res["xla_hot_us"] = per_gemm(hot, hot_ws)
    res["xla_hot_tile"] = xla_choice(hot.as_text())
    for tile in ([] if args.no_forced else candidate_tiles(m, k, n, args.quick)):
        text = tile_text(*tile)
        try:
            c = fn.lower(xs, ws).compile(
                compiler_options={"xla_gpu_override_gemm_autotuner": text})
            us = per_gemm(c, ws)
        except Exception as e:  # noqa: BLE001  (a tile that does not compile is reported)
            res["forced"].append({"tile": text, "error": str(e)[:200]})
            continue
        res["forced"].append({"tile": text, "us": us})
    if not args.no_pallas:
        ns = tuple(s["ns"])
        bounds = [0, *itertools.accumulate(ns)]
        parts = tuple(tuple(w[:, a:b] for a, b in zip(bounds, bounds[1:])) for w in ws)
        for t in pallas_tiles(m, k, ns, args.quick):
            pf = jax.jit(lambda xs, ps, t=t: tuple(pallas_gemm(x, p, t) for x, p in zip(xs, ps)))
            tile = {f: getattr(t, f) for f in ("block_n", "block_k", "num_splits", "num_warps",
                                                "num_stages")}
            try:
                c = pf.lower(xs, parts).compile()
                out0 = c(xs, parts)[0]
                err = float(jnp.max(jnp.abs(out0.astype(jnp.float32) - ref))
                            / jnp.max(jnp.abs(ref)))
                us = per_gemm(c, parts)
            except Exception as e:  # noqa: BLE001
                res["pallas"].append({**tile, "error": str(e)[:200]})
                continue
            res["pallas"].append({**tile, "us": us, "max_rel_err": err})
    ok = [f for f in res["forced"] if "us" in f]
    res["best_forced"] = min(ok, key=lambda f: f["us"]) if ok else None
    okp = [f for f in res["pallas"] if "us" in f]
    res["best_pallas"] = min(okp, key=lambda f: f["us"]) if okp else None
    return res


def gbps(wmb: float, us: float) -> float:
    return wmb * 2 ** 20 / us / 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cold-mb", type=float, default=320.0)
    p.add_argument("--only", default="", help="comma-separated shape names")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-pallas", action="store_true")
    p.add_argument("--no-forced", action="store_true", help="skip the forced XLA tiles")
    p.add_argument("--write-table", default=None,
                   help="write the skinny GEMM tuning table (pallas_kernels/"
                        "skinny_gemm_tuning.json format): shapes where the kernel beat XLA by "
                        ">= --min-gain")
    p.add_argument("--min-gain", type=float, default=0.03)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    report: dict[str, Any] = {**common.device_info(), "shapes": []}
    for r in common.run_shapes(shapes(args.tp), args.only, lambda s: run_shape(s, args)):
        report["shapes"].append(r)
        bf = r["best_forced"] or {}
        bp = r["best_pallas"] or {}
        print(f"{r['name']:12s} {r['weight_mb']:7.1f} MB  xla cold {r['xla_cold_us']:7.2f} us "
              f"({gbps(r['weight_mb'], r['xla_cold_us']):.2f} TB/s)  hot {r['xla_hot_us']:7.2f}  "
              f"forced best {bf.get('us', float('nan')):7.2f} [{bf.get('tile')}]  "
              f"pallas best {bp.get('us', float('nan')):7.2f} "
              f"[{ {k: bp.get(k) for k in ('block_n', 'block_k', 'num_splits', 'num_stages')} }]  "
              f"xla tile {r['xla_tile']}  ({r['seconds']:.0f} s)", flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    # The best single forced tile over each tp's layer shapes (sum of us).
    for tp in args.tp:
        rows = [r for r in report["shapes"] if r["tp"] == tp and r["layer"]]
        tiles: dict[str, float] = {}
        for r in rows:
            for f in r["forced"]:
                if "us" in f:
                    tiles.setdefault(f["tile"], 0.0)
                    tiles[f["tile"]] += f["us"]
        full = {t: v for t, v in tiles.items()
                if sum(1 for r in rows for f in r["forced"] if f.get("tile") == t and "us" in f)
                == len(rows)}
        if full:
            best = min(full, key=full.get)
            xla = sum(r["xla_cold_us"] for r in rows)
            report[f"best_single_tile_tp{tp}"] = {"tile": best, "layer_us": full[best],
                                                  "xla_layer_us": xla}
            print(f"tp{tp}: one tile for all layer GEMMs: {full[best]:.2f} us/layer vs XLA's "
                  f"{xla:.2f} [{best}]")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    if args.write_table:
        write_table(report, args)
    return 0


def write_table(report: dict[str, Any], args) -> None:
    """The tuning table: each shape's fastest tile where it beat XLA's GEMM by >= min_gain."""
    entries = []
    for r in report["shapes"]:
        bp = r.get("best_pallas")
        if not bp or bp["us"] > (1 - args.min_gain) * r["xla_cold_us"]:
            continue
        entries.append({"name": r["name"], "k": r["k"], "n": r["n"], "dtype": "bfloat16",
                        **{f: bp[f] for f in ("block_n", "block_k", "num_splits", "num_warps",
                                              "num_stages")},
                        "us": round(bp["us"], 2), "xla_us": round(r["xla_cold_us"], 2)})
    table = {
        "what": ("Tiles of pallas_kernels/skinny_gemm.py for decode-sized GEMMs, keyed by (K, N "
                 "= the weights' total width); only shapes where the kernel beat XLA's GEMM by "
                 f">= {args.min_gain:.0%} (per GEMM, cold weights, each with its split-K sum)."),
        "device": report.get("device_kind") or report.get("device"), "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
        "max_rows": 16, "entries": entries}
    with open(args.write_table, "w") as f:
        json.dump(table, f, indent=1)
    print(f"wrote {args.write_table}: {[e['name'] for e in entries]}")


if __name__ == "__main__":
    sys.exit(main())
