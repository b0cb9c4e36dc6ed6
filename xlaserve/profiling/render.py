"""Renders a profile report (the JSON-able dict made by `session.profile`): rich tables, a PNG.

Works from the dict alone, so a saved ``--json`` file can be rendered again later. Nothing here
runs jax or touches the runner.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _flops(f: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.2f} {unit}"
    return f"{f:.0f} FLOP"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _cache(hit: bool | None) -> str:
    return {True: "hit", False: "miss", None: "off"}[hit]


def compile_table(report: dict[str, Any]) -> Table:
    """One row per bucket: how it compiled and what the program holds."""
    t = Table(title="Compiled steps", title_justify="left")
    for col in ("T", "S", "W", "lower", "compile", "cache", "instrs", "fusions", "attention",
                "custom calls"):
        numeric = col in ("T", "S", "W", "instrs", "fusions")
        t.add_column(col, justify="right" if numeric else "left")
    for b in report["buckets"]:
        calls = ", ".join(f"{k}x{v}" for k, v in b["hlo"]["custom_calls"].items()) or "-"
        kernels = b["hlo"]["pallas_kernels"]
        if kernels:
            calls += " [" + ", ".join(kernels) + "]"
        t.add_row(str(b["num_tokens"]), str(b["num_seqs"]), str(b["history_width"]),
                  _seconds(b["lower_s"]),
                  _seconds(b["compile_s"]), _cache(b["cache_hit"]),
                  str(b["hlo"]["num_instructions"]), str(b["hlo"]["num_fusions"]),
                  escape(b["attention_impl"]), escape(calls))
    return t


def cost_table(report: dict[str, Any]) -> Table:
    """One row per bucket: XLA's cost and memory analysis, roofline and measured time."""
    t = Table(title=f"Cost on {report['peaks']['name']} ({report['peaks']['source']} peaks)",
              title_justify="left")
    with_attn = any(b.get("roofline_with_attention_s") for b in report["buckets"])
    cols = ["T", "S", "W", "FLOPs", "bytes", "args", "out", "temp", "code", "roofline", "bound"]
    cols += ["roof+attn"] if with_attn else []
    for col in cols + ["model roof", "measured", "meas/roof", "meas/model"]:
        t.add_column(col, justify="left" if col == "bound" else "right")
    for b in report["buckets"]:
        m = b["memory"]
        ratio = b["measured_over_roofline"]
        row = [str(b["num_tokens"]), str(b["num_seqs"]), str(b["history_width"]),
               _flops(b["flops"]), _bytes(b["bytes_accessed"]), _bytes(m["argument_bytes"]),
               _bytes(m["output_bytes"]), _bytes(m["temp_bytes"]),
               _bytes(m["generated_code_bytes"]), _seconds(b["roofline_s"]), b["roofline_bound"]]
        if with_attn:
            row.append(_seconds(b.get("roofline_with_attention_s")))
        model_ratio = b.get("measured_over_model_roofline")
        row += [_seconds(b.get("model_roofline_s")), _seconds(b["measured_s"]),
                "-" if ratio is None else f"{ratio:.1f}x",
                "-" if model_ratio is None else f"{model_ratio:.2f}x"]
        t.add_row(*row)
    t.caption = ("roofline: from XLA's cost analysis, which counts no FLOPs inside custom calls "
                 "(cuBLAS, Pallas) and counts the whole donated KV pool as traffic; model roof: "
                 "counted from the model's shapes (weights once, KV read and written, "
                 "2 FLOPs/weight/token, attention) - compare measured with this one")
    if with_attn:
        t.caption += ("; roof+attn: the XLA roofline plus an analytic estimate of the Pallas "
                      "attention kernel")
    return t


def summary_table(report: dict[str, Any]) -> Table:
    """Model, KV capacity and compile totals."""
    s = report["summary"]
    t = Table(title="Model summary", title_justify="left", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    fits = {True: "yes", False: "NO", None: "unknown"}[s["fits_device"]]
    rows = [
        ("model", f"{report['config']['model']} ({report['model']['model_type']}, "
                  f"{report['model']['dtype']})"),
        ("device", f"{report['device']['device_kind']} x{report['device']['count']}"),
        ("parameters", f"{_count(s['param_count'])} ({_bytes(s['param_bytes'])})"),
        ("KV bytes per token", _bytes(s["kv_bytes_per_token"])),
        ("KV cache", f"{_bytes(s['kv_cache_bytes'])}: {s['num_pages']} pages x "
                     f"{s['page_size']} tokens"),
        ("KV capacity", f"{s['kv_capacity_tokens']} tokens"),
        ("sequences at full context", f"{s['max_concurrent_seqs']} at {s['max_model_len']} "
                                      f"tokens (max_num_seqs {s['max_num_seqs']})"),
        ("largest step (per device)", f"{_bytes(s['peak_step_bytes'])} of "
                                f"{_bytes(s['device_memory_bytes'])}, fits: {fits}"),
        ("buckets", f"{s['num_buckets']} ({s['num_cache_hits']} from the compilation cache)"),
        ("compile total", _seconds(s["compile_s_total"])),
        ("  of which cold", _seconds(s["compile_s_cold"])),
        ("  of which from cache", _seconds(s["compile_s_from_cache"])),
    ]
    if report.get("all_reduce"):
        rows.append(("tp all-reduce", report["all_reduce"]))
    if report.get("decode_gemm"):
        rows.append(("decode GEMMs", report["decode_gemm"]))
    if report.get("early_launch"):
        rows.append(("early launch (PDL)", report["early_launch"]))
    flags = report.get("xla_flags")
    if flags and flags.get("disabled"):
        rows.append(("XLA defaults", "off (XLASERVE_NO_DEFAULT_XLA_FLAGS)"))
    elif flags:
        rows.append(("XLA defaults set", " ".join(flags["set_by_xlaserve"]) or "-"))
        if flags["not_set"]:
            rows.append(("XLA defaults NOT set", "; ".join(flags["not_set"])))
        if flags["late"]:
            rows.append(("XLA defaults", "added after jax started: they did not apply"))
    for what, value in rows:
        t.add_row(what, escape(value))
    return t


def recompile_table(recompiles: dict[str, Any]) -> Table:
    """Every compile seen after warm-up, with the shapes that caused it."""
    t = Table(title=f"Compiles after warm-up ({recompiles['num_requests']} replayed requests, "
                    f"{recompiles['num_steps']} steps)", title_justify="left")
    for col in ("function", "seconds", "input shapes"):
        t.add_column(col)
    for c in recompiles["compiles_after_warmup"]:
        t.add_row(escape(c["fun_name"]), f"{c['seconds']:.3f}", escape(c["shapes"] or "-"))
    for c in recompiles["runner_compile_log"]:  # the runner's own account, with step shapes
        t.add_row("ModelRunner step", "-",
                  escape(f"{c['shapes']} ({c['num_compiles']} compile(s))"))
    return t


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """Prints the tables (and the recompile list when there is one)."""
    if console is None:
        # Not a terminal (a file, a CI log): use a wide page rather than wrapping every cell.
        import sys

        console = Console(width=None if sys.stdout.isatty() else 180)
    console.print(compile_table(report))
    console.print(cost_table(report))
    console.print(summary_table(report))
    notes = report.get("not_available")
    if notes:
        console.print("Not available on this platform:")
        for note in notes:
            console.print(f"  - {escape(note)}")
    if report.get("recompiles") is not None:
        rc = report["recompiles"]
        if rc["compiles_after_warmup"] or rc["runner_compile_log"]:
            console.print(recompile_table(rc))
        else:
            console.print(f"No compiles after warm-up ({rc['num_requests']} replayed requests, "
                          f"{rc['num_steps']} steps).")


def plot(report: dict[str, Any], path: str) -> None:
    """Writes a PNG: roofline time (and measured time, if any) per bucket, log scale."""
    import matplotlib

    matplotlib.use("Agg")  # file output only; never opens a window
    import matplotlib.pyplot as plt

    buckets = report["buckets"]
    labels = [f"{b['num_tokens']}x{b['num_seqs']}" + ("" if b["history_width"] == 1 else "+pen")
              for b in buckets]
    x = list(range(len(buckets)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(buckets) + 2), 4.5))
    ax.plot(x, [b["roofline_s"] * 1e3 for b in buckets], "o--", label="roofline (XLA cost)")
    attn = [(i, b["roofline_with_attention_s"]) for i, b in zip(x, buckets)
            if b.get("roofline_with_attention_s")]
    if attn:
        ax.plot([i for i, _ in attn], [r * 1e3 for _, r in attn], "^:",
                label="roofline + attention estimate")
    measured = [(i, b["measured_s"]) for i, b in zip(x, buckets) if b["measured_s"] is not None]
    if measured:
        ax.plot([i for i, _ in measured], [m * 1e3 for _, m in measured], "s-",
                label="measured step")
    ax.set_yscale("log")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("bucket (tokens x sequences)")
    ax.set_ylabel("time per step (ms)")
    peaks = report["peaks"]
    ax.set_title(f"{report['config']['model']} on {report['device']['device_kind']} "
                 f"({peaks['name']}, {peaks['source']} peaks)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
