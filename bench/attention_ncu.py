"""Hardware counters of the decode attention kernels (issue 3's "profile of why"), under ncu.

Run it with XLA_PYTHON_CLIENT_PREALLOCATE=false: ncu saves and restores the device memory of each
kernel replay, and jax's default pool (75% of the GPU) made that take minutes per kernel.

Runs the issue's decode point (B=64, ctx 1024, 32 q / 8 KV heads, head dim 128, page 16, bf16)
through our kernel (tuned config) and jax's ``paged_attention`` (its defaults, and its best
parameters from the session-5 scan), each called ``--calls`` times after a warm-up, so that
Nsight Compute can read each kernel's counters. Run it under ncu with a kernel-name filter:

    ncu --clock-control none -k regex:attention --metrics <list> --csv \\
        python bench/attention_ncu.py > ncu.csv
    python bench/attention_ncu.py --summarize ncu.csv --out bench/results/.../attention_ncu.json

The summary gives, per kernel: duration, DRAM bytes read and written (what the kernel really
moved, against the bytes the bench counts), DRAM throughput as a fraction of the GPU's peak, the
L2 hit rate and the achieved occupancy. Without ncu the script just runs the kernels.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import pathlib
import statistics
import sys
from typing import Any

METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "lts__t_sector_hit_rate.pct",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__grid_size",
    "launch__registers_per_thread",
    "launch__occupancy_limit_registers",
)

# jax paged_attention's fastest correct parameters in the session-5 scan (144.5 us on the H100).
JAX_BEST = dict(k_splits=4, pages_per_compute_block=4, num_warps=4)


def run(calls: int) -> dict[str, Any]:
    import xlaserve  # noqa: F401  (first: sets xlaserve's default XLA flags)
    import jax
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa

    import attention as bench
    import common

    case = bench.make_case("decode_b64_ctx1024", [1] * 64, [1024] * 64)
    fn, args = bench.ours(case)
    jfn, jargs = bench.jax_paged(case)
    best = jax.jit(functools.partial(jpa.paged_attention, **JAX_BEST))
    order = []
    for name, f, a in (("ours", fn, args), ("jax_default", jfn, jargs), ("jax_best", best, jargs)):
        jax.block_until_ready(f(*a))  # compile + first run (also profiled: ncu sees launches)
        for _ in range(calls):
            jax.block_until_ready(f(*a))
        order.append(name)
    return {**common.device_info(), "case": case.name, "counted_bytes": case.bytes,
            "order": order, "calls": calls + 1}


def summarize(csv_path: pathlib.Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Per kernel name: the median of each metric over its profiled launches."""
    text = csv_path.read_text().splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith('"ID"'))
    rows = list(csv.DictReader(text[start:]))
    per: dict[str, dict[str, list[float]]] = {}
    units: dict[str, str] = {}
    for r in rows:
        if not r.get("Metric Value"):
            continue
        try:
            value = float(r["Metric Value"].replace(",", ""))
        except ValueError:
            continue
        # jax's kernel has one name for all its parameters: the grid tells them apart.
        name = f'{r["Kernel Name"]} grid{r.get("Grid Size", "")}'
        per.setdefault(name, {}).setdefault(r["Metric Name"], []).append(value)
        units[r["Metric Name"]] = r.get("Metric Unit", "")
    kernels = {}
    for name, metrics in per.items():
        k = {m: statistics.median(v) for m, v in metrics.items()}
        k["launches"] = max(len(v) for v in metrics.values())
        dur = k.get("gpu__time_duration.sum")
        if dur and units.get("gpu__time_duration.sum") in ("ns", "nsecond"):
            read = k.get("dram__bytes_read.sum", 0) * _scale(units.get("dram__bytes_read.sum"))
            k["dram_read_TB/s"] = read / (dur * 1e-9) / 1e12
            k["counted_TB/s"] = meta.get("counted_bytes", 0) / (dur * 1e-9) / 1e12
            k["dram_read_over_counted"] = read / meta["counted_bytes"] if meta.get(
                "counted_bytes") else None
        kernels[name] = k
    return {"units": units, "kernels": kernels, **meta}


def _scale(unit: str | None) -> float:
    return {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}.get(unit or "byte", 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=1, help="profiled calls per kernel after warm-up")
    p.add_argument("--summarize", type=pathlib.Path, default=None,
                   help="ncu --csv output to summarize (instead of running the kernels)")
    p.add_argument("--meta", type=pathlib.Path, default=None,
                   help="the JSON the profiled run wrote with --out (case, counted bytes)")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    if args.summarize is not None:
        meta = json.loads(args.meta.read_text()) if args.meta else {}
        result = summarize(args.summarize, meta)
        for name, k in result["kernels"].items():
            print(name)
            for m, v in k.items():
                print(f"  {m:55s} {v:.4g}" if isinstance(v, float) else f"  {m:55s} {v}")
    else:
        result = run(args.calls)
        print(json.dumps(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
