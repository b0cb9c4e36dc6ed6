"""`xlaserve profile`: what XLA made of each compiled step, and what it costs on this device.

Builds the engine's model runner from the usual engine flags, compiles every step bucket through
the runner's own warm-up, and reports per bucket the lowering/compile time, persistent-cache
hits, HLO counts, custom calls and Pallas kernels, XLA's FLOPs/bytes and memory analysis, and the
roofline time on this device; `--run` adds the measured step time. `--check-recompiles N` replays
N random requests through a real Engine and lists every compile after warm-up (exit 1 if any).

Output: a rich table on stdout, `--json FILE` (every field), `--plot FILE.png` (matplotlib),
`--dump-hlo DIR` (optimized HLO per bucket). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from xlaserve.cli import UsageError

# Hidden test hook: after the replay, run one step padded to this (T, S), which no bucket has.
_FORCE_SHAPE_HELP = argparse.SUPPRESS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from xlaserve.engine_args import add_engine_args

    add_engine_args(parser)
    g = parser.add_argument_group("profile")
    g.add_argument("--buckets", nargs="+", metavar="T[xS]",
                   help="profile only these buckets: a token bucket T (all its S buckets) or TxS")
    g.add_argument("--run", action="store_true",
                   help="also time each bucket's step and compare with the roofline")
    g.add_argument("--repeats", type=int, default=10, help="timed steps per bucket with --run")
    g.add_argument("--run-kv-len", type=int, metavar="N",
                   help="context tokens per sequence in --run steps and in the attention "
                        "estimate (default max_model_len / 2)")
    g.add_argument("--json", metavar="FILE", help="write every field as JSON ('-' = stdout)")
    g.add_argument("--dump-hlo", metavar="DIR", help="write each bucket's optimized HLO here")
    g.add_argument("--plot", metavar="FILE.png",
                   help="plot roofline (and measured, with --run) time per bucket")
    g.add_argument("--check-recompiles", type=int, default=0, metavar="N",
                   help="replay N random requests; list compiles after warm-up, exit 1 if any")
    g.add_argument("--no-penalty-programs", action="store_true",
                   help="skip the penalty-history variant of each bucket (halves compiles; the "
                        "engine itself compiles them)")
    g.add_argument("--replay-seed", type=int, default=0, help="seed of the random requests")
    peaks = g.add_mutually_exclusive_group()
    peaks.add_argument("--calibrate", action="store_true",
                       help="measure copy bandwidth and matmul rate here instead of the table")
    peaks.add_argument("--peaks", metavar="NAME",
                       help="use this peak-table entry (e.g. h100-sxm) instead of detecting it")
    g.add_argument("--force-shape", metavar="TxS", help=_FORCE_SHAPE_HELP)


def _parse_shape(text: str, flag: str) -> tuple[int, int | None]:
    t, _, s = text.lower().partition("x")
    try:
        return int(t), (int(s) if s else None)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected T or TxS, e.g. 128 or 128x8") from None


def select_buckets(requested: list[str] | None,
                   available: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The (T, S) buckets to profile: all the runner has, or those named by --buckets."""
    if not requested:
        return list(available)
    chosen: list[tuple[int, int]] = []
    for text in requested:
        t, s = _parse_shape(text, "--buckets")
        match = [b for b in available if b[0] == t and (s is None or b[1] == s)]
        if not match:
            raise UsageError(f"--buckets {text!r}: not a bucket of this engine; it has "
                             f"{', '.join(f'{a}x{b}' for a, b in available)}")
        chosen += [b for b in match if b not in chosen]
    return chosen


def _device_peaks(args: argparse.Namespace) -> Any:
    import jax

    from xlaserve.runtime import hardware

    try:
        if args.peaks:
            return hardware.peaks_by_name(args.peaks)
        if args.calibrate:
            return hardware.calibrate(jax.devices()[0])
        return hardware.peaks_for_device(jax.devices()[0])
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_destinations(args: argparse.Namespace) -> None:
    """--json, --plot and --dump-hlo must be writable before the (long) profile runs."""
    for flag, value in (("--json", args.json), ("--plot", args.plot)):
        if value is None or (flag == "--json" and value == "-"):
            continue
        path = pathlib.Path(value)
        if path.is_dir():
            raise UsageError(f"{flag}={value!r}: is a directory")
        if not path.absolute().parent.is_dir():
            raise UsageError(f"{flag}={value!r}: its directory does not exist")
    if args.dump_hlo is not None:
        try:
            pathlib.Path(args.dump_hlo).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--dump-hlo={args.dump_hlo!r}: cannot create it "
                             f"({e.strerror or e})") from None


def run(args: argparse.Namespace) -> int:
    from xlaserve.engine_args import check_engine_config, engine_config_from_args
    from xlaserve.profiling import render, session

    if args.repeats < 1:
        raise UsageError(f"--repeats {args.repeats}: must be >= 1")
    if args.check_recompiles < 0:
        raise UsageError(f"--check-recompiles {args.check_recompiles}: must be >= 0")
    if args.check_recompiles and (args.buckets or args.no_penalty_programs):
        raise UsageError("--check-recompiles replays requests through every program the engine "
                         "compiles; drop --buckets and --no-penalty-programs")
    if args.run_kv_len is not None and args.run_kv_len < 1:
        raise UsageError(f"--run-kv-len {args.run_kv_len}: must be >= 1")
    force: tuple[int, int] | None = None  # (T, S)
    if args.force_shape:
        force_t, force_s = _parse_shape(args.force_shape, "--force-shape")
        if force_s is None or not args.check_recompiles:
            raise UsageError(f"--force-shape {args.force_shape!r}: expected TxS, with "
                             f"--check-recompiles")
        force = (force_t, force_s)
    _check_destinations(args)
    cfg = engine_config_from_args(args)
    check_engine_config(cfg)
    peaks = _device_peaks(args)
    report = session.profile(cfg, peaks, args, select_buckets, force)
    if args.json == "-":  # stdout carries the JSON alone; the tables go to stderr
        from rich.console import Console

        render.print_report(report, Console(file=sys.stderr))
    else:
        render.print_report(report)
    if args.json:
        text = json.dumps(report, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            pathlib.Path(args.json).write_text(text + "\n")
    if args.plot:
        render.plot(report, args.plot)
    rc = report.get("recompiles")
    if rc is not None and (rc["compiles_after_warmup"] or rc["runner_compiles_after_warmup"]):
        print(f"xlaserve profile: {len(rc['compiles_after_warmup'])} compile(s) after warm-up "
              f"({rc['runner_compiles_after_warmup']} counted by the runner)", file=sys.stderr)
        return 1
    return 0
