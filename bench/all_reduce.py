"""Latency of one all-reduce between the GPUs of one process: xlaserve's kernel vs XLA's collective.

A program of `--chain` dependent all-reduces of a [T, D] array (as a decode step calls them: each
one's input depends on the last one's output) is timed back to back; the time per all-reduce is
the program's time over the chain length, minus nothing (the elementwise op between them is
counted). Both sides run the same program except for the reduction: the kernel
(sharding/all_reduce.py) or jax.lax.psum (XLA's collective; NCCL under xlaserve's default flags).

  python bench/all_reduce.py --tp 2 --tokens 1 16 128 --out $OUT/all_reduce.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import statistics
import sys
import time

import xlaserve  # noqa: F401  (first: xlaserve's default XLA flags)
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xlaserve.sharding import all_reduce as ar
from xlaserve.sharding.specs import _shard_map


def program(mesh: Mesh, reduce, chain: int):
    spec = PartitionSpec("model")

    def body(x):  # [1, T, D]
        y = x[0]
        for _ in range(chain):
            y = reduce(y * 0.5)
        return y[None]
    return jax.jit(_shard_map(body, mesh, in_specs=(spec,), out_specs=spec))


def time_us(fn, x, iters: int, repeats: int) -> list[float]:
    jax.block_until_ready(fn(x))
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        y = None
        for _ in range(iters):
            y = fn(x)
        jax.block_until_ready(y)
        out.append((time.perf_counter() - start) / iters * 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--chain", type=int, default=64)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    devices = jax.devices()[:args.tp]
    mesh = Mesh(np.array(devices).reshape(1, args.tp), ("data", "model"))
    kernel = ar.AllReduce.create(mesh)
    psum = functools.partial(jax.lax.psum, axis_name="model")
    sharding = NamedSharding(mesh, PartitionSpec("model"))
    rows = []
    for t in args.tokens:
        x = jax.device_put(np.random.default_rng(0).standard_normal(
            (args.tp, t, args.hidden)).astype(args.dtype), sharding)
        row = {"tokens": t, "bytes_per_rank": t * args.hidden * x.dtype.itemsize}
        for name, reduce in (("kernel", kernel), ("xla", psum)):
            for chain in (1, args.chain):
                us = time_us(program(mesh, reduce, chain), x, args.iters, args.repeats)
                row[f"{name}_chain{chain}_us"] = round(statistics.median(us), 2)
            row[f"{name}_us_per_all_reduce"] = round(row[f"{name}_chain{args.chain}_us"]
                                                     / args.chain, 2)
        k, x_ = (program(mesh, r, 1)(x) for r in (kernel, psum))
        row["max_abs_diff"] = float(np.max(np.abs(np.asarray(k, np.float32)
                                                  - np.asarray(x_, np.float32))))
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"bench": "all_reduce", "device": devices[0].device_kind, "tp": args.tp,
              "jax": jax.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(),
              "command": " ".join([sys.executable] + sys.argv), "chain": args.chain,
              "hidden": args.hidden, "dtype": args.dtype, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
