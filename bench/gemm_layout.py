"""Does the weight's memory layout limit the decode skinny GEMM? (issue 6, session 20)

The tp=2 decode step's half-width GEMMs run at 2.7-3.4 TB/s in the model (q/k/v 25 MB in
9.0 us), and session 15 measured q/k/v at 7.8 us even with its weight in L2: the kernel, not
HBM, sets the time. With the weight row-major [K, N] and block_n = 32, every program reads
64-byte pieces of rows 6 KB apart. This times the same Pallas (Triton) split-K kernel over three
layouts of the same weight:

  kn     [K, N]            today's layout (rows of block_n * 2 bytes per program)
  nk     [N, K]            the checkpoint's own (torch Linear) layout: rows of block_k * 2 bytes
  tiled  [N / bn, K, bn]   each program's slice is one contiguous run

Each GEMM returns its float32 split-K partials (the model's consumers read them), in a chain of
n independent GEMMs on n weight copies (>= --cold-mb in all, so weights come from HBM), timed
as one program: us per GEMM, launch gaps included. Also XLA's GEMM on kn and on nk weights for
a 2048-row prefill product (the layout must not cost the prefill path) and for 16 rows.

    python bench/gemm_layout.py --out /tmp/gemm_layout.json [--only qkv_tp2,o_tp2]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import time
from typing import Any

import common  # noqa: F401  (first: xlaserve's XLA flags)
from xlaserve.pallas_kernels.skinny_gemm import SkinnyGemmConfig, skinny_gemm_swiglu
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from xlaserve.pallas_kernels.ragged_paged_attention import compiler_params

H, NQ, NKV, HD, INTER = 4096, 32, 8, 128, 14336  # Llama 3.1 8B
LAYOUTS = ("kn", "nk", "tiled")
VARIANTS = (*LAYOUTS, "stream", "uneven", "gated")


def shapes() -> list[dict[str, Any]]:
    out = []
    for tp in (2, 1):
        for name, k, n in (("qkv", H, (NQ + 2 * NKV) * HD // tp), ("o", NQ * HD // tp, H),
                           ("down", INTER // tp, H), ("gate_up", H, 2 * INTER // tp)):
            out.append({"name": f"{name}_tp{tp}", "k": k, "n": n})
    return out


def to_layout(w: jax.Array, layout: str, bn: int) -> jax.Array:
    k, n = w.shape
    if layout == "kn":
        return w
    if layout == "nk":
        return w.T
    return w.reshape(k, n // bn, bn).transpose(1, 0, 2)  # [N / bn, K, bn]


def _kernel(x_ref, w_ref, o_ref, *, layout: str, bn: int, bk: int, steps: int):
    j, s = pl.program_id(0), pl.program_id(1)
    k0 = s * (steps * bk)
    m = x_ref.shape[0]

    def body(t, acc):
        xs = x_ref[:, pl.ds(t * bk, bk)]
        if layout == "stream":  # kn's loads, no product: what the loads alone take
            ws = w_ref[pl.ds(k0 + t * bk, bk), pl.ds(j * bn, bn)].astype(jnp.float32)
            return acc + jnp.sum(ws.reshape(bk // m, m, bn), axis=0)
        if layout == "kn":
            ws = w_ref[pl.ds(k0 + t * bk, bk), pl.ds(j * bn, bn)]
            dims = (((1,), (0,)), ((), ()))
        elif layout == "nk":
            ws = w_ref[pl.ds(j * bn, bn), pl.ds(k0 + t * bk, bk)]
            dims = (((1,), (1,)), ((), ()))
        else:
            ws = w_ref[j, pl.ds(k0 + t * bk, bk), :]
            dims = (((1,), (0,)), ((), ()))
        return acc + lax.dot_general(xs, ws, dims, preferred_element_type=jnp.float32)

    o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros((m, bn), jnp.float32))


def _uneven_kernel(x_ref, w_ref, o_ref, *, bn: int, bk: int, steps: int, splits: int):
    """kn with `splits` uneven K slices (whole bk steps, sizes differ by at most one), so the
    grid can be a multiple of the SM count."""
    j, s = pl.program_id(0), pl.program_id(1)
    lo, hi = s * steps // splits, (s + 1) * steps // splits
    m = x_ref.shape[0]

    def body(t, acc):
        xs = x_ref[:, pl.ds(t * bk, bk)]
        ws = w_ref[pl.ds(t * bk, bk), pl.ds(j * bn, bn)]
        return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

    o_ref[...] = lax.fori_loop(lo, hi, body, jnp.zeros((m, bn), jnp.float32))


@functools.partial(jax.jit, static_argnames=("k", "n", "cfg", "interpret"))
def gemm_uneven(x, w, *, k: int, n: int, cfg: tuple[int, int, int, int, int],
                interpret: bool = False):
    bn, bk, splits, warps, stages = cfg
    m = x.shape[0]
    return pl.pallas_call(
        functools.partial(_uneven_kernel, bn=bn, bk=bk, steps=k // bk, splits=splits),
        grid=(n // bn, splits),
        in_specs=[pl.BlockSpec((m, k), lambda j, s: (0, 0)),
                  pl.BlockSpec(w.shape, lambda j, s: (0, 0))],
        out_specs=pl.BlockSpec((None, m, bn), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
        compiler_params=compiler_params(warps, stages), interpret=interpret,
        name=f"uneven_k{k}_n{n}")(x, w)


def gated_tiles(k: int, n: int, quick: bool) -> list[tuple[int, int, int, int, int]]:
    """skinny_gemm_swiglu's tiles for gate and up [K, N / 2] each (one split)."""
    return [(bn, bk, 1, warps, stages)
            for bn, bk, warps, stages in itertools.product(
                (32, 64, 128), (64, 128), (4, 8), (4,) if quick else (3, 4, 5))
            if (n // 2) % bn == 0 and k % bk == 0]


def gated(x, w, *, cfg):
    """silu(x @ gate) * (x @ up) through the library's gated kernel; w = (gate, up)."""
    bn, bk, splits, warps, stages = cfg
    return skinny_gemm_swiglu(x, *w, config=SkinnyGemmConfig(
        block_n=bn, block_k=bk, num_splits=splits, num_warps=warps, num_stages=stages))


def xla_swiglu(x, w):
    n = w.shape[1] // 2
    y = jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype).astype(jnp.float32)
    return (jax.nn.silu(y[:, :n]) * y[:, n:]).astype(x.dtype)


def uneven_tiles(k: int, n: int, sms: int) -> list[tuple[int, int, int, int, int]]:
    """(bn, bk, splits, warps, stages) whose grid is 96-100% of 1-3 programs per SM, K split
    unevenly."""
    out = []
    for bn, bk, per_sm in itertools.product((64, 128, 256), (64, 128), (1, 2, 3)):
        if n % bn:
            continue
        splits = sms * per_sm // (n // bn)
        if not splits or n // bn * splits < 0.96 * sms * per_sm or k // bk < 2 * splits:
            continue
        for warps in (4, 8):
            out.append((bn, bk, splits, warps, 4))
    return out


@functools.partial(jax.jit, static_argnames=("layout", "k", "n", "cfg", "interpret"))
def gemm(x, w, *, layout: str, k: int, n: int, cfg: tuple[int, int, int, int, int],
         interpret: bool = False):
    bn, bk, splits, warps, stages = cfg
    m = x.shape[0]
    ks = k // splits
    return pl.pallas_call(
        functools.partial(_kernel, layout=layout, bn=bn, bk=bk, steps=ks // bk),
        grid=(n // bn, splits),
        in_specs=[pl.BlockSpec((m, ks), lambda j, s: (0, s)),
                  pl.BlockSpec(w.shape, lambda j, s: (0,) * w.ndim)],
        out_specs=pl.BlockSpec((None, m, bn), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
        compiler_params=compiler_params(warps, stages), interpret=interpret,
        name=f"layout_{layout}_k{k}_n{n}")(x, w)


def tiles(k: int, n: int, quick: bool) -> list[tuple[int, int, int, int, int]]:
    out = []
    for bn, bk, splits in itertools.product((32, 64, 128), (128, 256), (1, 2, 4, 8)):
        ctas = n // bn * splits
        if n % bn or k % (splits * bk) or k // splits // bk < 2 or not 96 <= ctas <= 1100:
            continue
        for stages in ((4,) if quick else (3, 4, 6)):
            out.append((bn, bk, splits, 4, stages))
    return out


def run_shape(s: dict[str, Any], args) -> dict[str, Any]:
    k, n, m = s["k"], s["n"], 16
    wbytes = k * n * 2
    num = max(4, math.ceil(args.cold_mb * 2 ** 20 / wbytes))
    length = max(num, args.chain)  # GEMMs per program: weight copy i % num (still cold)
    key = jax.random.key(0)
    xs = tuple(jax.random.normal(jax.random.fold_in(key, i), (m, k), jnp.bfloat16)
               for i in range(length))
    w0 = jax.random.normal(jax.random.fold_in(key, 999), (k, n), jnp.bfloat16) * 0.02
    ws = tuple(w0 + jnp.bfloat16(i * 1e-3) for i in range(num))
    ref = jnp.dot(xs[0].astype(jnp.float32), ws[0].astype(jnp.float32))
    res: dict[str, Any] = {**s, "weight_mb": wbytes / 2 ** 20, "copies": num, "chain": length,
                           "runs": []}

    def timed(fn, w_args):
        return common.time_fn(fn, xs, w_args, iters=5, repeats=5, warmup=1) / length * 1e6

    def chained(one):  # one(x, w) -> partials; the program runs it `length` times
        return jax.jit(lambda xs, ws: tuple(one(x, ws[i % len(ws)]) for i, x in enumerate(xs)))

    # the read floor: XLA's column sums of each weight (bytes read, ~nothing written)
    res["read_xla_us"] = timed(chained(lambda x, w: jnp.sum(w, axis=0, dtype=jnp.float32)), ws)

    # XLA's GEMM, 16 rows, kn and nk (nk: the dot of x with w.T; XLA reads the transpose)
    for layout in ("kn", "nk"):
        wl = tuple(to_layout(w, layout, 1) for w in ws)
        fn = chained(lambda x, w, layout=layout: jnp.dot(
            x, w if layout == "kn" else w.T, preferred_element_type=jnp.float32))
        res[f"xla16_{layout}_us"] = timed(fn, wl)
        del wl
    # prefill-sized: 2048 rows against one weight (compute-bound; the layout must not matter)
    xp = jax.random.normal(key, (2048, k), jnp.bfloat16)
    for layout in ("kn", "nk"):
        wl = to_layout(ws[0], layout, 1)
        fp = jax.jit(lambda x, w, layout=layout: jnp.dot(
            x, w if layout == "kn" else w.T, preferred_element_type=jnp.float32).astype(x.dtype))
        res[f"xla2048_{layout}_us"] = common.time_fn(fp, xp, wl, iters=10, repeats=5) * 1e6
    sms = jax.devices()[0].core_count
    plan = [(v, c) for v in args.variants.split(",")
            for c in (uneven_tiles(k, n, sms) if v == "uneven" else
                      gated_tiles(k, n, args.quick) if v == "gated" else tiles(k, n, args.quick))]
    gated_ref = None
    if "gated" in args.variants.split(","):  # XLA: the GEMM over [gate | up], then silu(g) * u
        gated_ref = xla_swiglu(xs[0], ws[0]).astype(jnp.float32)
        res["xla_swiglu_us"] = timed(chained(xla_swiglu), ws)
    for layout, cfg in plan:
        if layout == "gated":
            wl = tuple((w[:, :n // 2], w[:, n // 2:]) for w in ws)
            fn = chained(lambda x, w, cfg=cfg: gated(x, w, cfg=cfg))
            want, finish = gated_ref, (lambda out: out.astype(jnp.float32))
        else:
            wl = tuple(to_layout(w, layout if layout in LAYOUTS else "kn", cfg[0]) for w in ws)
            if layout == "uneven":
                fn = chained(lambda x, w, cfg=cfg: gemm_uneven(x, w, k=k, n=n, cfg=cfg))
            else:
                fn = chained(lambda x, w, layout=layout, cfg=cfg: gemm(
                    x, w, layout=layout, k=k, n=n, cfg=cfg))
            # the loads-only variant computes no product: nothing to compare
            want, finish = (None if layout == "stream" else ref), (lambda out: out.sum(axis=0))
        run = {"layout": layout, "bn": cfg[0], "bk": cfg[1], "splits": cfg[2],
               "warps": cfg[3], "stages": cfg[4]}
        try:
            c = fn.lower(xs, wl).compile()
            out0 = finish(c(xs, wl)[0])
            if want is not None:
                run["max_rel_err"] = float(jnp.max(jnp.abs(out0 - want))
                                           / jnp.max(jnp.abs(want)))
            run["us"] = timed(c, wl)
        except Exception as e:  # noqa: BLE001  (reported, the sweep goes on)
            run["error"] = str(e)[:300]
        res["runs"].append(run)
        del wl
    for layout in VARIANTS:
        ok = [r for r in res["runs"] if r["layout"] == layout and "us" in r]
        res[f"best_{layout}"] = min(ok, key=lambda r: r["us"]) if ok else None
    if args.trace_dir:
        res["traced"] = traced(s, xs[:num], ws, res, args.trace_dir)
    return res


def traced(s: dict[str, Any], xs, ws, res: dict[str, Any], trace_dir: str) -> dict[str, Any]:
    """Kernel durations from a profiler trace (no launch gaps, no host): one chain over the
    distinct weight copies for XLA's read floor (column sums), XLA's 16-row GEMM, and the best
    tile of each Pallas variant. us = mean kernel duration; span_us = the chain's device span
    per GEMM (gaps included)."""
    import trace_summary

    k, n = s["k"], s["n"]
    plan: list[tuple[str, Any, Any]] = [
        ("read_xla", lambda x, w: jnp.sum(w, axis=0, dtype=jnp.float32), ws),
        ("xla16", lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32), ws)]
    for v in ("kn", "uneven"):
        b = res.get(f"best_{v}")
        if b:
            cfg = (b["bn"], b["bk"], b["splits"], b["warps"], b["stages"])
            one = (functools.partial(gemm_uneven, k=k, n=n, cfg=cfg) if v == "uneven" else
                   functools.partial(gemm, layout=v, k=k, n=n, cfg=cfg))
            plan.append((v, one, ws))
    b = res.get("best_gated")
    if b:
        cfg = (b["bn"], b["bk"], b["splits"], b["warps"], b["stages"])
        plan.append(("xla_swiglu", xla_swiglu, ws))
        plan.append(("gated", functools.partial(gated, cfg=cfg),
                     tuple((w[:, :n // 2], w[:, n // 2:]) for w in ws)))
    out: dict[str, Any] = {}
    for label, one, w_args in plan:
        fn = jax.jit(lambda xs, ws, one=one: tuple(one(x, w) for x, w in zip(xs, ws)))
        d = f"{trace_dir}/{s['name']}_{label}"
        summ = trace_summary.trace_calls(lambda fn=fn, w=w_args: fn(xs, w), d, steps=3)
        dev = max((t for t in summ["threads"] if t["device"]),
                  key=lambda t: t["busy_us_per_step"])
        top = dev["top"][0]
        out[label] = {"kernel": top["name"], "us": top["us_per_step"] / top["calls_per_step"],
                      "top": [(t["name"][:60], round(t["us_per_step"] / t["calls_per_step"], 2),
                               t["calls_per_step"]) for t in dev["top"][:3]],
                      "calls": top["calls_per_step"],
                      "span_us": dev["span_us_per_step"] / len(xs),
                      "tb_s": s["k"] * s["n"] * 2 / (top["us_per_step"]
                                                     / top["calls_per_step"]) / 1e6}
        print(f"  traced {s['name']} {label}: {out[label]}", flush=True)
    return out


def single(args) -> int:
    """--single: each named config's GEMM alone, 3 calls on 3 weight copies (for ncu)."""
    key = jax.random.key(0)
    for spec in args.single.split(","):
        name, variant, tile = spec.split(":")
        s = next(x for x in shapes() if x["name"] == name)
        k, n = s["k"], s["n"]
        x = jax.random.normal(key, (16, k), jnp.bfloat16)
        ws = [jax.random.normal(jax.random.fold_in(key, i), (k, n), jnp.bfloat16)
              for i in range(3)]
        if variant == "xla":
            fn = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
        else:
            cfg = tuple(int(v) for v in tile.split("/"))
            ws = [to_layout(w, variant if variant in LAYOUTS else "kn", cfg[0]) for w in ws]
            fn = jax.jit(functools.partial(gemm_uneven, k=k, n=n, cfg=cfg)) \
                if variant == "uneven" else \
                jax.jit(functools.partial(gemm, layout=variant, k=k, n=n, cfg=cfg))
        jax.block_until_ready(fn(x, ws[0]))
        for w in ws:
            jax.block_until_ready(fn(x, w))
        print("ran", spec, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cold-mb", type=float, default=320.0)
    p.add_argument("--only", default="")
    p.add_argument("--quick", action="store_true", help="stages 4 only")
    p.add_argument("--chain", type=int, default=32, help="GEMMs per timed program (>= copies)")
    p.add_argument("--variants", default="kn,nk,tiled",
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--single", default="",
                   help="name:variant:bn/bk/splits/warps/stages,... run alone (for ncu); "
                        "variant xla for XLA's GEMM")
    p.add_argument("--trace-dir", default="", help="also trace the best of each variant")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.single:
        return single(args)
    report: dict[str, Any] = {**common.device_info(), "date": time.strftime("%F"), "shapes": []}
    for r in common.run_shapes(shapes(), args.only, lambda s: run_shape(s, args)):
        report["shapes"].append(r)
        line = [f"{r['name']:12s} {r['weight_mb']:6.1f} MB read {r['read_xla_us']:6.2f}",
                f"xla16 kn {r['xla16_kn_us']:6.2f} nk {r['xla16_nk_us']:6.2f}",
                f"xla2048 kn {r['xla2048_kn_us']:7.1f} nk {r['xla2048_nk_us']:7.1f}"]
        for layout in VARIANTS:
            b = r.get(f"best_{layout}")
            if b:
                tb = r["weight_mb"] * 2 ** 20 / b["us"] / 1e6
                line.append(f"{layout} {b['us']:6.2f} us {tb:.2f} TB/s "
                            f"[{b['bn']}/{b['bk']}/{b['splits']}/{b['warps']}/{b['stages']}]")
        print("  ".join(line) + f"  ({r['seconds']:.0f} s)", flush=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
