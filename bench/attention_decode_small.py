"""Small-batch decode attention as the runner calls it, timed per kernel from a profiler trace.

At batch 1 the attention kernel is launch- and latency-bound (about 10 us a layer for 4 MB of
K/V at 1k context on an H100), so a timing loop's own small kernels would hide what a tile change
does. This script calls the kernel the way the model step does (the runner's T=16, S=8 bucket:
one real sequence, the other rows padding; a page table as wide as max_model_len, permuted
pages), traces `--calls` calls of each config under jax.profiler, and reports the device time of
the attention kernel and of the split combine separately, per call.

    python bench/attention_decode_small.py --out $OUT/attn_small.json
    python bench/attention_decode_small.py --contexts 1024 --table-width 2112 --batch 1 4
"""

from __future__ import annotations

import argparse
import collections
import datetime
import functools
import itertools
import json
import pathlib
import sys
import tempfile
from typing import Any

import xlaserve  # noqa: F401  (first: sets xlaserve's default XLA flags)
import jax
import jax.numpy as jnp
import numpy as np

import trace_summary
from xlaserve.pallas_kernels import ragged_paged_attention as rpa
from xlaserve.pallas_kernels.tuning import lookup_config

Cfg = rpa.RaggedPagedAttentionConfig


def decode_args(batch: int, context: int, table_width: int, *, t_bucket: int = 16,
                s_bucket: int = 8, heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                page_size: int = 16, seed: int = 0) -> tuple[Any, ...]:
    """Runner-shaped decode inputs: `batch` sequences of `context` keys, one new token each."""
    rng = np.random.default_rng(seed)
    t_bucket, s_bucket = max(t_bucket, batch), max(s_bucket, batch)
    m = -(-table_width // page_size)
    used = -(-context // page_size)
    num_pages = batch * used + 1
    perm = rng.permutation(np.arange(1, num_pages)).astype(np.int32)
    table = np.zeros((s_bucket, m), np.int32)
    for s in range(batch):
        table[s, :used] = perm[s * used:(s + 1) * used]
    kv_lens = np.array([context] * batch + [0] * (s_bucket - batch), np.int32)
    cu = np.array(list(range(batch + 1)) + [batch] * (s_bucket - batch), np.int32)
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(k1, (t_bucket, heads, head_dim), jnp.bfloat16)
    pools = (kv_heads, num_pages, page_size, head_dim)
    k = jax.random.normal(k2, pools, jnp.bfloat16)
    v = jax.random.normal(k3, pools, jnp.bfloat16)
    return (q, k, v, jnp.asarray(kv_lens), jnp.asarray(table), jnp.asarray(cu),
            jnp.asarray([batch], jnp.int32))


def kernel_us(trace_dir: str, calls: int) -> dict[str, float]:
    """Device us per call by kernel class: attention, the rest (the combine and any glue)."""
    try:
        path = trace_summary.find_trace(trace_dir)
    except FileNotFoundError:  # no trace (the CPU dry run)
        return {}
    families: collections.Counter[str] = collections.Counter()
    for t in trace_summary.summarize(path, steps=calls)["threads"]:
        if t["device"]:
            families.update(t["families_us_per_step"])
    families.pop("memcpy", None)
    out = {"attention": families.pop("attention (pallas)", 0.0), "other": sum(families.values())}
    out["total"] = out["attention"] + out["other"]
    return {k: round(v, 2) for k, v in out.items()}


def time_config(args: tuple[Any, ...], cfg: Cfg | None, ref: jax.Array, calls: int,
                interpret: bool = False, pools: list[tuple[jax.Array, jax.Array]] | None = None,
                ) -> dict[str, Any]:
    """`pools`: other (k_pages, v_pages) copies the timed calls rotate through, so each call
    reads K/V that the last ones evicted from L2 (as in the model, where 31 other layers' weights
    and K/V pass between two calls of one layer's attention)."""
    fn = jax.jit(functools.partial(rpa.ragged_paged_attention, sm_scale=128 ** -0.5,
                                   config=cfg, interpret=interpret))
    row: dict[str, Any] = {}
    try:
        out = fn(*args)
        err = float(jnp.max(jnp.abs(out[:len(ref)].astype(jnp.float32) - ref))
                    / (jnp.max(jnp.abs(ref)) + 1e-6))
        row["rel_err"] = round(err, 5)
        pools = pools or [args[1:3]]
        arg_sets = [(args[0], *kv, *args[3:]) for kv in pools]
        for i in range(3):
            jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d, create_perfetto_trace=True):
                jax.block_until_ready([fn(*arg_sets[i % len(arg_sets)])
                                       for i in range(calls)])
            row.update(kernel_us(d, calls))
    except Exception as e:  # noqa: BLE001 - a config that fails is reported, not fatal
        row["error"] = repr(e)[:300]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 2048, 8192])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--table-width", type=int, default=None,
                   help="keys the page table spans (max_model_len); default context + 64")
    p.add_argument("--ppb", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--heads", type=int, default=32, help="q heads per device (tp=2: 16)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads per device (tp=2: 4)")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--cold", type=int, default=0,
                   help="rotate the timed calls over this many K/V pool copies (L2-cold reads)")
    p.add_argument("--out", default=None)
    p.add_argument("--interpret", action="store_true", help="CPU dry run of the script's logic")
    a = p.parse_args(argv)
    rows = []
    for b, ctx in itertools.product(a.batch, a.contexts):
        width = max(a.table_width or 0, ctx + 64)
        args = decode_args(b, ctx, width, heads=a.heads, kv_heads=a.kv_heads)
        ref = rpa.ragged_paged_attention_reference(*args, sm_scale=128 ** -0.5)[:b]
        ref = ref.astype(jnp.float32)
        pools = [args[1:3]] + [(a_ + 0, b_ + 0) for a_, b_ in [args[1:3]] * max(a.cold - 1, 0)]
        table = lookup_config(head_dim=128, page_size=16, group=a.heads // a.kv_heads,
                              num_tokens=args[0].shape[0], num_seqs=args[4].shape[0],
                              max_kv_len=args[4].shape[1] * 16, num_kv_heads=a.kv_heads)
        cands = [("table", table)] + [
            (f"ppb{ppb}_sp{sp}_st{st}", Cfg(block_q=4, pages_per_block=ppb, num_splits=sp,
                                             num_warps=4, num_stages=st, key_gather=True))
            for ppb, sp, st in itertools.product(a.ppb, a.splits, a.stages)]
        best = None
        for name, cfg in cands:
            row = {"batch": b, "context": ctx, "table_width": width, "heads": a.heads,
                   "kv_heads": a.kv_heads, "name": name,
                   "config": str(cfg), "cold": a.cold,
                   **time_config(args, cfg, ref, a.calls, a.interpret, pools)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if "total" in row and row["rel_err"] < 1e-2 and (best is None
                                                             or row["total"] < best["total"]):
                best = row
        if best:
            print(f"== B={b} ctx={ctx} heads {a.heads}/{a.kv_heads}: table "
                  f"{rows[-len(cands)].get('total')} us, best {best['name']} {best['total']} us",
                  flush=True)
    rep = {"bench": "attention_decode_small", "device": jax.devices()[0].device_kind,
           "jax": jax.__version__, "date": datetime.datetime.now(datetime.timezone.utc)
           .isoformat(timespec="seconds"), "command": " ".join(["python", *sys.argv]),
           "rows": rows}
    if a.out:
        pathlib.Path(a.out).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
