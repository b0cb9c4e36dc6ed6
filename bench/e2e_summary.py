"""Summary table of one end-to-end run: latency.json, throughput.json and peers.json in DIR.

  python bench/e2e_summary.py DIR              # the short table run_e2e_gpu.sh prints last
  python bench/e2e_summary.py DIR --markdown   # rows for the tables in BENCHMARKS.md

Reads JSON only (no jax). bench/ is not a package: `e2e_common` is imported from this directory.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

from e2e_common import fmt


def _load(path: pathlib.Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _peer(peers: dict[str, Any] | None, mode: str, batch: int, in_len: int,
          out_len: int | None = None) -> dict[str, Any] | None:
    for r in (peers or {}).get("results", []):
        if (r.get("mode") == mode and r["batch"] == batch and r["input_len"] == in_len
                and (out_len is None or r["output_len"] == out_len)):
            return r
    return None


def summary_rows(results_dir: str) -> list[tuple[str, str, str, str, str, str, str]]:
    """(metric, ours, roofline, ratio, peer, ours/peer speed, compiles) rows from one run's JSON.

    The peer is bench/peers.py (HF transformers, eager unless only static_compile ran); its
    cases differ in batch size from the offline runs, and the row says which one is used.
    """
    d = pathlib.Path(results_dir)
    lat, thr, peers = _load(d / "latency.json"), _load(d / "throughput.json"), _load(
        d / "peers.json")
    modes = sorted({r.get("mode") for r in (peers or {}).get("results", [])})
    mode = "eager" if "eager" in modes else (modes[0] if modes else "eager")
    rows = []
    for c in (lat or {}).get("cases", []):
        ctx = c["context"]
        peer = _peer(peers, mode, 1, ctx)
        pd = peer["decode_ms_per_token"] if peer else None
        rows.append((f"decode ms/token, batch 1, ctx {ctx}", fmt(c["decode_ms_per_token"]),
                     fmt(c["decode_roofline_ms"]), fmt(c["decode_fraction_of_roofline"]),
                     f"{fmt(pd)} ({mode} 1x{ctx})" if pd else "-",
                     fmt(pd / c["decode_ms_per_token"]) if pd and c["decode_ms_per_token"]
                     else "-", str(lat["compiles_after_warmup"])))
        pt = peer["ttft_s"] * 1e3 if peer else None
        rows.append((f"TTFT ms, prompt {ctx}", fmt(c["ttft_ms"], 1), fmt(c["ttft_roofline_ms"], 1),
                     fmt(c["ttft_fraction_of_roofline"]),
                     f"{fmt(pt, 1)} ({mode} 1x{ctx})" if pt else "-",
                     fmt(pt / c["ttft_ms"]) if pt else "-", str(lat["compiles_after_warmup"])))
    peer_tp = {"128/128": (32, 128, 128), "2048/128": (8, 2048, 128)}
    for c in (thr or {}).get("cases", []):
        peer = _peer(peers, mode, *peer_tp[c["case"]]) if c["case"] in peer_tp else None
        po = peer["output_tokens_per_s"] if peer else None
        tag = f" ({mode} {peer['batch']}x{peer['input_len']}x{peer['output_len']})" if peer else ""
        rows.append((f"offline out tok/s {c['case']} (N={c['num_requests']})",
                     fmt(c["output_tokens_per_s"], 0), fmt(c["roofline_output_tokens_per_s"], 0),
                     fmt(c["fraction_of_roofline"]), f"{fmt(po, 0)}{tag}" if po else "-",
                     fmt(c["output_tokens_per_s"] / po) if po else "-",
                     str(thr["compiles_after_warmup"])))
    return rows


def print_summary(results_dir: str, markdown: bool = False) -> None:
    """The short table run_e2e_gpu.sh prints last (or Markdown rows for BENCHMARKS.md)."""
    head = ("metric", "ours", "roofline", "fraction of roofline", "peer", "ours vs peer (speed)",
            "compiles after warm-up")
    rows = summary_rows(results_dir)
    d = pathlib.Path(results_dir)
    for name in ("latency", "throughput"):
        rep = _load(d / f"{name}.json")
        if rep:
            ceil = rep.get("ceilings", {})
            bw = ceil.get("copy_bytes_per_s")
            mm = ceil.get("matmul_bf16_flops_per_s")
            print(f"{name}: {rep.get('device')} jax {rep.get('jax')} {rep.get('date_utc')} "
                  f"commit {rep.get('git_commit')}; measured copy {fmt(bw and bw / 1e9, 0)} GB/s, "
                  f"bf16 matmul {fmt(mm and mm / 1e12, 1)} TFLOP/s")
    lat, thr = _load(d / "latency.json"), _load(d / "throughput.json")
    for name, t in ((lat or {}).get("targets") or {}).items():
        print(f"target {name}: {t['value']:.3f} ({t['target']}) "
              f"{'MET' if t['met'] else 'NOT MET'}")
    for c in (thr or {}).get("cases", []):
        idle = c.get("host_gaps", {}).get("idle_fraction_lower_bound")
        tgt = c.get("target_output_tokens_per_s")
        met = "" if tgt is None else (f"target >= {tgt:.0f}: "
                                      f"{'MET' if c['target_met'] else 'NOT MET'}; ")
        print(f"throughput {c['case']}: {met}idle between steps (lower bound) {fmt(idle)}, "
              f"preemptions {c.get('preemptions')}")
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
        return
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results_dir")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    print_summary(args.results_dir, args.markdown)


if __name__ == "__main__":
    main()
