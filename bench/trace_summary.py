"""Summarises a jax.profiler trace (perfetto JSON): where the device time of a step goes.

For every device stream in the trace (process names with "/device:"), it sums the kernel events:
busy time (union of the event intervals), the span from the first start to the last end, the
idle share of that span, and the kernels with the most total time. Host threads get the same
totals, so dispatch time and waits show up beside the device's.

    python bench/trace_summary.py /tmp/trace_dir            # newest perfetto_trace.json.gz under it
    python bench/trace_summary.py /tmp/trace_dir --json out.json --top 40

Used by bench/decode_breakdown.py --trace. Never imported by package code.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
from typing import Any


def find_trace(root: str | pathlib.Path) -> pathlib.Path:
    """The newest perfetto_trace.json.gz under `root` (jax.profiler's run directories)."""
    found = sorted(pathlib.Path(root).glob("**/perfetto_trace.json.gz"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {root}: trace with "
                                f"jax.profiler.trace(dir, create_perfetto_trace=True)")
    return found[-1]


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -float("inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def kernel_family(name: str) -> str:
    """A coarse class of an XLA/Pallas kernel name, for grouping the per-step time."""
    low = name.lower()
    for key, family in (("nccl", "collective"), ("all_reduce", "collective"),
                        ("allreduce", "collective"), ("all-reduce", "collective"),
                        ("collective", "collective"),
                        ("ragged_paged_attention", "attention (pallas)"),
                        ("write_kv_pages", "kv write (pallas)"), ("scatter", "scatter"),
                        ("gemm", "gemm"), ("cublas", "gemm"), ("sm90_xmma", "gemm"),
                        ("cutlass", "gemm"), ("dot", "gemm"), ("nvjet", "gemm"),
                        ("sort", "sort/topk"), ("topk", "sort/topk"), ("top_k", "sort/topk"),
                        ("reduce", "reduce"), ("concatenate", "concatenate"),
                        ("transpose", "transpose"), ("copy", "copy"), ("memcpy", "memcpy"),
                        ("memset", "memset"), ("convert", "elementwise"),
                        ("add", "elementwise"), ("select", "elementwise"),
                        ("broadcast", "elementwise"), ("fusion", "other fusion")):
        if key in low:
            return family
    return "other"


LARGE_GAP_US = 300.0  # idle longer than this is counted as between steps (host, not launches)


def _base(name: str) -> str:
    """A kernel's name without XLA's numeric suffix (fusion_12 -> fusion), cut to 60 chars."""
    return re.sub(r"[._]\d+$", "", name)[:60]


def _gaps(evs: list[dict[str, Any]]) -> dict[str, Any]:
    """Idle time between consecutive kernels of one stream, split at LARGE_GAP_US."""
    evs = sorted(evs, key=lambda e: float(e["ts"]))
    small = large = 0.0
    n_small = 0
    before: dict[str, float] = collections.defaultdict(float)
    pairs: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    largest: list[tuple[float, str, str]] = []
    end = None
    prev = ""
    for e in evs:
        ts = float(e["ts"])
        if end is not None and ts > end:
            gap = ts - end
            if gap > LARGE_GAP_US:
                large += gap
            else:
                small += gap
                n_small += 1
                before[kernel_family(e["name"])] += gap
                pair = pairs[f"{_base(prev)} -> {_base(e['name'])}"]
                pair[0] += gap
                pair[1] += 1
            largest.append((gap, prev, e["name"]))
        end = ts + float(e["dur"]) if end is None else max(end, ts + float(e["dur"]))
        prev = e["name"]
    largest.sort(reverse=True)
    top_pairs = sorted(pairs.items(), key=lambda kv: -kv[1][0])[:12]
    return {"small": small, "large": large, "n_small": n_small, "before": before,
            "pairs": [{"pair": k[:160], "gap_us": v[0], "count": v[1]} for k, v in top_pairs],
            "largest": [{"gap_us": g, "after": a[:80], "before": b[:80]}
                        for g, a, b in largest[:8]]}


def summarize(trace_path: str | pathlib.Path, *, steps: int | None = None,
              top: int = 30) -> dict[str, Any]:
    """Per-thread totals of a perfetto trace; `steps` divides the totals into per-step numbers."""
    with gzip.open(trace_path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    by_thread: dict[tuple[Any, Any], list[dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_thread[(e["pid"], e["tid"])].append(e)
    per = max(steps or 1, 1)
    out: dict[str, Any] = {"trace": str(trace_path), "steps": steps, "threads": []}
    for key, evs in by_thread.items():
        proc, thread = procs.get(key[0], str(key[0])), threads.get(key, str(key[1]))
        device = "/device:" in proc
        intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in evs]
        busy = _union_us(intervals)
        span = max(b for _, b in intervals) - min(a for a, _ in intervals)
        names: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        families: dict[str, float] = collections.defaultdict(float)
        for e in evs:
            n = re.sub(r"[._]\d+$", "", e["name"]) if device else e["name"]
            names[n][0] += float(e["dur"])
            names[n][1] += 1
            if device:
                families[kernel_family(e["name"])] += float(e["dur"])
        top_names = sorted(names.items(), key=lambda kv: -kv[1][0])[:top]
        gaps = _gaps(evs) if device else None
        out["threads"].append({
            "process": proc, "thread": thread, "device": device, "events": len(evs),
            "events_per_step": len(evs) / per,
            "busy_us_per_step": busy / per, "span_us_per_step": span / per,
            "idle_fraction_of_span": 1 - busy / span if span > 0 else None,
            "families_us_per_step": {k: v / per for k, v in
                                     sorted(families.items(), key=lambda kv: -kv[1])},
            "top": [{"name": n[:160], "us_per_step": v[0] / per, "calls_per_step": v[1] / per}
                    for n, v in top_names],
        })
        if gaps is not None:
            out["threads"][-1]["gaps"] = {
                "small_gap_us_per_step": gaps["small"] / per,
                "large_gap_us_per_step": gaps["large"] / per,
                "small_gaps_per_step": gaps["n_small"] / per,
                "small_gap_us_before_family_per_step": {
                    k: v / per for k, v in sorted(gaps["before"].items(), key=lambda kv: -kv[1])},
                "pairs_per_step": [{**p, "gap_us": p["gap_us"] / per, "count": p["count"] / per}
                                   for p in gaps["pairs"]],
                "largest": gaps["largest"]}
    out["threads"].sort(key=lambda t: (not t["device"], -t["busy_us_per_step"]))
    return out


def trace_calls(call: Any, trace_dir: str | pathlib.Path, steps: int) -> dict[str, Any]:
    """Runs `call` once, then `steps` times back to back under jax.profiler; prints and returns
    the summary of that trace (per step)."""
    import jax

    jax.block_until_ready(call())
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        jax.block_until_ready([call() for _ in range(steps)])
    summary = summarize(find_trace(trace_dir), steps=steps)
    print(render(summary), flush=True)
    return summary


def render(summary: dict[str, Any], *, top: int = 15) -> str:
    lines = [f"trace {summary['trace']} (per step over {summary['steps']} steps)"]
    for t in summary["threads"]:
        if not t["device"] and t["busy_us_per_step"] < 50:
            continue
        idle = t["idle_fraction_of_span"]
        lines.append(f"-- {t['process']} / {t['thread']}: {t['events_per_step']:.0f} events, "
                     f"busy {t['busy_us_per_step']:.0f} us of span {t['span_us_per_step']:.0f}"
                     f" us" + (f" (idle {100 * idle:.0f}%)" if idle is not None else ""))
        if t["device"]:
            fams = ", ".join(f"{k} {v:.0f}" for k, v in t["families_us_per_step"].items())
            lines.append(f"   families (us): {fams}")
            g = t.get("gaps")
            if g:
                before = ", ".join(f"{k} {v:.0f}" for k, v in
                                   g["small_gap_us_before_family_per_step"].items())
                lines.append(f"   gaps/step: {g['small_gap_us_per_step']:.0f} us in "
                             f"{g['small_gaps_per_step']:.0f} gaps < {LARGE_GAP_US:.0f} us "
                             f"(before: {before}); {g['large_gap_us_per_step']:.0f} us larger")
                for p in g.get("pairs_per_step", [])[:8]:
                    lines.append(f"     gap {p['gap_us']:7.1f} us x{p['count']:5.1f}  {p['pair']}")
        for row in t["top"][:top]:
            lines.append(f"   {row['us_per_step']:9.1f} us  x{row['calls_per_step']:6.1f}  "
                         f"{row['name'][:100]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    summary = summarize(find_trace(args.trace_dir), steps=args.steps, top=args.top)
    print(render(summary))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
