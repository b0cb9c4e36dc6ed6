"""Shared pieces of the end-to-end benchmarks (latency.py, throughput.py, serving.py).

What lives here:
  * `add_engine_flags` / `build_engine`: one engine per benchmark process, built by
    `Engine.build_runner` as `Engine.from_config` does, with three benchmark choices made explicit
    and recorded in every JSON: no tokenizer (dummy 8B weights come from a config.json-only
    directory; token-id prompts need none), no penalty-history programs (halves warm-up compiles;
    the benchmarks use temperature 0 without penalties), and chosen shape buckets (each bucket is
    one compile of the whole model, tens of seconds at 8B).
  * `TimedRunner`: a transparent proxy around the runner that timestamps every `execute_async`
    call, so the host time between device calls (device idle time) is measured, not guessed.
  * `measure_ceilings`, `ModelCost`, `roofline`: re-exported from bench/rooflines.py.
  * `start_report` / `finish_report`: the first and last steps of latency.py and throughput.py
    (metadata, ceilings, engine; compile counts, JSON).
  * `run_metadata`, `engine_summary`, `percentiles`, `write_json`.

bench/ is not a package: the scripts import this module as `e2e_common` (the script's own
directory is first on sys.path when run as ``python bench/<name>.py``). Never imported by package
code.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

import xlaserve  # noqa: F401  (first: sets xlaserve's default XLA flags before jax starts)
from rooflines import ModelCost, measure_ceilings, roofline  # noqa: F401  (bench/; re-exported)

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_8B_CONFIG = "bench/configs/llama3.1-8b"


# ---------------------------------------------------------------------------------------- flags


def int_list(text: str) -> tuple[int, ...]:
    """Parses "16,128,1024" (commas or spaces) into a tuple of ints."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        return tuple(int(p) for p in parts)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers separated by commas") from e


def add_engine_flags(p: argparse.ArgumentParser, *, max_num_seqs: int,
                     max_num_batched_tokens: int) -> None:
    """Engine flags shared by the benchmarks (defaults differ per benchmark)."""
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=DEFAULT_8B_CONFIG,
                   help="model directory or builtin:NAME (default: the Llama-3.1-8B config)")
    g.add_argument("--load-format", default=None,
                   help="auto | safetensors | orbax | dummy (default: dummy for a directory "
                        "without weights, else auto)")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    g.add_argument("--max-num-seqs", type=int, default=max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=max_num_batched_tokens)
    g.add_argument("--max-model-len", type=int, default=None,
                   help="default: the longest case's prompt + output, rounded up to a page")
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--num-pages", type=int, default=None,
                   help="KV pages incl. page 0 (default: from gpu memory utilization)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--attention-impl", default="auto")
    g.add_argument("--compilation-cache-dir", default=None)
    g.add_argument("--token-buckets", type=int_list, default=None,
                   help="T buckets, ascending, the last = max-num-batched-tokens "
                        "(default: the runner's powers of two)")
    g.add_argument("--seq-buckets", type=int_list, default=None,
                   help="S buckets, ascending, the last >= max-num-seqs "
                        "(default: the runner's powers of two)")
    g.add_argument("--enable-penalties", action="store_true",
                   help="also compile the penalty-history programs (doubles warm-up)")
    g.add_argument("--sync-engine", action="store_true",
                   help="Engine(async_scheduling=False): no host/device overlap")
    g.add_argument("--seed", type=int, default=0, help="prompt and weight seed")
    g.add_argument("--data-parallel-size", type=int, default=1,
                   help="replicas, one GPU each (runtime/data_parallel.py)")
    g.add_argument("--kv-write-min-tokens", type=int, default=None,
                   help="experiment: steps of at least this many tokens write K/V with the Pallas "
                        "kernel, smaller ones with XLA's scatter (default: ops' own threshold)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip measuring copy bandwidth / matmul rate (rooflines then missing)")
    p.add_argument("--out", default=None, help="write the JSON report here")


def resolve_load_format(model: str, load_format: str | None) -> str:
    """dummy for a directory with config.json but no weights, else the given / auto."""
    if load_format:
        return load_format
    if model.startswith("builtin:"):
        return "auto"
    from xlaserve.checkpoints import orbax_io

    path = pathlib.Path(model)
    has_weights = any(path.glob("*.safetensors")) or orbax_io.is_orbax_dir(path)
    return "auto" if has_weights else "dummy"


# ---------------------------------------------------------------------------------------- engine


@dataclasses.dataclass
class StepRecord:
    """Host timestamps (perf_counter seconds) of one runner call."""

    dispatch_start: float  # execute_async entered
    dispatch_end: float  # execute_async returned (the program is queued on the device)
    result_call: float | None  # the engine asked for the result
    result_return: float | None  # the result was on the host
    num_tokens_bucket: int  # T
    num_seqs_bucket: int  # S
    num_seqs: int  # real sequences


class _TimedPending:
    """Wraps a runner's PendingOutput; stamps when `result()` is asked for and returns."""

    def __init__(self, pending: Any, record: StepRecord) -> None:
        self._pending = pending
        self._record = record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pending, name)

    def result(self) -> Any:
        rec = self._record
        if rec.result_call is None:
            rec.result_call = time.perf_counter()
        out = self._pending.result()
        if rec.result_return is None:
            rec.result_return = time.perf_counter()
        return out


class TimedRunner:
    """Wraps a runner; records host timestamps of every `execute_async` call (all the Engine makes).

    Everything else is delegated, so the Engine cannot tell the difference. With one step in
    flight at a time, the device is certainly idle from the moment step N's result reaches the
    host until step N+1 is dispatched (`host_gap`): a lower bound on device idle time. When
    `result()` returns at once (it did not wait), the device had finished earlier still and the
    host was the bottleneck for that step (`host_bound_steps`). latency.py also replays one
    decode step back to back to get the device-only time, which gives idle time directly.
    """

    WAIT_THRESHOLD_S = 50e-6  # result() returning faster than this did not wait for the device

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self.records: list[StepRecord] = []
        self.last_inputs: Any = None
        self.recording = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    @property
    def inner(self) -> Any:
        return self._runner

    def _record(self, inputs: Any, start: float, end: float) -> StepRecord:
        rec = StepRecord(start, end, None, None, int(inputs.num_tokens_bucket),
                         int(inputs.num_seqs_bucket), int(np.asarray(inputs.num_seqs)[0]))
        if self.recording:
            self.records.append(rec)
            self.last_inputs = inputs
        return rec

    def execute_async(self, inputs: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        pending = self._runner.execute_async(inputs, **kwargs)
        return _TimedPending(pending, self._record(inputs, start, time.perf_counter()))

    def reset(self) -> None:
        self.records = []

    def idle_summary(self, records: Sequence[StepRecord] | None = None,
                     only_token_bucket: int | None = None) -> dict[str, Any]:
        """Host gaps between consecutive device calls over `records` (default: all), as
        fractions of the dispatch-to-dispatch period.

        Args:
          records: consecutive records of one run.
          only_token_bucket: count only pairs of consecutive steps that both have this T bucket
            (e.g. the decode bucket at batch 1).
        """
        recs = sorted(self.records if records is None else records,
                      key=lambda r: r.dispatch_start)
        done = [r for r in recs if r.result_return is not None]
        if len(done) < 2:
            return {"num_steps": len(recs)}
        gaps, periods, waits = [], [], []
        for cur, nxt in zip(done, done[1:]):
            if only_token_bucket is not None and not (
                    cur.num_tokens_bucket == nxt.num_tokens_bucket == only_token_bucket):
                continue
            period = nxt.dispatch_start - cur.dispatch_start
            if period > 1.0:  # the engine ran out of work (between requests): not a step gap
                continue
            gaps.append(max(0.0, nxt.dispatch_start - cur.result_return))  # type: ignore[operator]
            periods.append(period)
            waits.append(cur.result_return - cur.result_call)  # type: ignore[operator]
        if not periods:
            return {"num_steps": len(recs)}
        if only_token_bucket is not None:
            recs = [r for r in recs if r.num_tokens_bucket == only_token_bucket]
        buckets: dict[str, int] = {}
        for r in recs:
            key = f"{r.num_tokens_bucket}x{r.num_seqs_bucket}"
            buckets[key] = buckets.get(key, 0) + 1
        return {
            "num_steps": len(recs),
            "step_period_ms_median": 1e3 * statistics.median(periods),
            "host_gap_ms_median": 1e3 * statistics.median(gaps),
            "host_gap_ms_p90": 1e3 * float(np.percentile(gaps, 90)),
            "dispatch_ms_median": 1e3 * statistics.median(r.dispatch_end - r.dispatch_start
                                                           for r in done),
            "idle_fraction_lower_bound": sum(gaps) / sum(periods),
            "host_bound_steps_fraction": sum(w < self.WAIT_THRESHOLD_S for w in waits) /
            len(waits),
            "step_buckets_TxS": buckets,
            "note": "idle lower bound = time from a step's result reaching the host to the next "
                    "dispatch, over the dispatch-to-dispatch period; host-bound steps: result() "
                    "did not wait, so the device sat idle for an unmeasured extra time",
        }


@dataclasses.dataclass
class BuiltEngine:
    """An engine ready to benchmark, with what was chosen to build it."""

    engine: Any  # xlaserve.runtime.engine.Engine (a DataParallelEngine at --data-parallel-size > 1)
    timed: TimedRunner  # the runner proxy the engine calls (replica 0's)
    model_config: Any  # ModelConfig
    info: dict[str, Any]  # recorded in the JSON: build path, timings, warm-up
    timed_replicas: tuple[TimedRunner, ...] = ()  # every replica's proxy (timed is the first)

    def set_recording(self, on: bool) -> None:
        for t in self.timed_replicas or (self.timed,):
            t.recording = on

    def reset_records(self) -> None:
        for t in self.timed_replicas or (self.timed,):
            t.reset()


def build_engine(args: argparse.Namespace, *, max_model_len: int) -> BuiltEngine:
    """`Engine.build_runner` with the benchmark's choices, warm-up, then `Engine(tokenizer=None)`.

    Timings in `info`: `load_and_build_s` covers loading the weights and building the runner
    (KV pages included): `build_runner` does both, so they are not timed apart. `load_s` is the
    same number, kept for readers of older reports. `warmup_s` times the warm-up compiles
    (every bucket pair of the runner).

    Args:
      args: parsed `add_engine_flags` flags.
      max_model_len: used when --max-model-len is not given.
    Raises:
      ValueError: bad bucket lists (ModelRunner names the field), or tensor parallelism.
    """
    import jax

    from xlaserve.engine_args import engine_config_from_options
    from xlaserve.runtime.data_parallel import DataParallelEngine, build_runners, warm_up
    from xlaserve.runtime.engine import Engine

    load_format = resolve_load_format(args.model, args.load_format)
    options = dict(
        load_format=load_format, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len or max_model_len, page_size=args.page_size,
        num_pages=args.num_pages, gpu_memory_utilization=args.gpu_memory_utilization,
        attention_impl=args.attention_impl, compilation_cache_dir=args.compilation_cache_dir,
        seed=args.seed, data_parallel_size=getattr(args, "data_parallel_size", 1))
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    config = engine_config_from_options(args.model, **options)
    if config.parallel.tensor_parallel_size != 1:
        raise ValueError("tensor_parallel_size: the e2e benchmarks run one device per replica "
                         "(bench/tp_scaling.py covers tensor parallelism)")
    t0 = time.perf_counter()
    runners, loaded = build_runners(
        config, enable_penalties=args.enable_penalties, token_buckets=args.token_buckets,
        seq_buckets=args.seq_buckets)
    jax.block_until_ready([(r.params, r.kv_cache) for r in runners])
    load_and_build_s = time.perf_counter() - t0

    compiled: list[dict[str, Any]] = []

    def progress(done: int, total: int, key: tuple[int, int, int], record: Any) -> None:
        compiled.append({"T": key[0], "S": key[1], "W": key[2],
                         "lower_s": round(float(record.lower_s), 3),
                         "compile_s": round(float(record.compile_s), 3),
                         "cache_hit": record.cache_hit})
        print(f"[warm-up] {done}/{total} T={key[0]} S={key[1]} W={key[2]} "
              f"compile {record.compile_s:.1f}s cache_hit={record.cache_hit}", flush=True)

    t0 = time.perf_counter()
    warm_up(runners, progress)  # as Engine.from_config
    warmup_s = time.perf_counter() - t0
    timed = [TimedRunner(r) for r in runners]
    engines = [Engine(config, t, tokenizer=None, model_config=loaded.config,
                      async_scheduling=not args.sync_engine) for t in timed]
    engine = engines[0] if len(engines) == 1 else DataParallelEngine(engines)
    info = {
        "engine_build": "build_runners -> warmup -> Engine(tokenizer=None)"
                        + (f" x {len(engines)} -> DataParallelEngine" if len(engines) > 1 else ""),
        "data_parallel_size": len(engines),
        "load_format": load_format, "tokenizer": None,
        "enable_penalties": bool(args.enable_penalties),
        "load_and_build_s": round(load_and_build_s, 2), "load_s": round(load_and_build_s, 2),
        "warmup_s": round(warmup_s, 2), "warmup_programs": compiled,
    }
    return BuiltEngine(engine, timed[0], loaded.config, info, tuple(timed))


def engine_summary(built: BuiltEngine) -> dict[str, Any]:
    """Engine configuration as recorded in every JSON."""
    e, r = built.engine, built.timed
    cfg = e.config
    return {
        "model": cfg.model, "load_format": cfg.load_format, "dtype": cfg.dtype,
        "attention_impl": cfg.attention_impl,
        "max_num_batched_tokens": cfg.scheduler.max_num_batched_tokens,
        "max_num_seqs": cfg.scheduler.max_num_seqs, "max_model_len": cfg.scheduler.max_model_len,
        "page_size": int(r.page_size), "num_pages": int(r.num_pages),
        "enable_prefix_caching": cfg.cache.enable_prefix_caching,
        "token_buckets": list(r.token_buckets), "seq_buckets": list(r.seq_buckets),
        "history_widths": list(r.history_widths), "async_scheduling": e.async_scheduling,
        **built.info,
    }


def compiles_after_warmup(built: BuiltEngine) -> int:
    """From the engine's stats (the runner's recompile guard)."""
    return int(built.engine.stats().compiles_after_warmup)


def compile_report(built: BuiltEngine) -> dict[str, Any]:
    """`compiles_after_warmup` and the runner's `compile_log` (each late compile), for a JSON."""
    return {"compiles_after_warmup": compiles_after_warmup(built),
            "compile_log": [str(x) for x in built.timed.compile_log]}


def start_report(bench: str, args: argparse.Namespace, *,
                 max_model_len: int) -> tuple[dict[str, Any], BuiltEngine, ModelCost]:
    """Run metadata, ceilings (measured before the engine takes the memory), engine, model cost.

    Returns (report with "ceilings" and "engine" filled in, the engine, its ModelCost).
    """
    report: dict[str, Any] = run_metadata(bench)
    report["ceilings"] = measure_ceilings(args.no_calibrate)
    from xlaserve.pallas_kernels import ops
    if getattr(args, "kv_write_min_tokens", None) is not None:
        ops._PALLAS_WRITE_MIN_TOKENS = args.kv_write_min_tokens  # read when the steps trace
    report["kv_write_min_tokens"] = ops._PALLAS_WRITE_MIN_TOKENS
    built = build_engine(args, max_model_len=max_model_len)
    report["engine"] = engine_summary(built)
    return report, built, ModelCost.from_config(built.model_config)


def finish_report(report: dict[str, Any], built: BuiltEngine, out: str | None) -> int:
    """Adds the compile counts, writes the JSON, prints the summary's first line.

    Returns the exit status: 0, or 3 when something compiled after warm-up.
    """
    report.update(compile_report(built))
    write_json(out, report)
    print(f"\n{report['bench']}  {report['device']}  jax {report['jax']}  "
          f"compiles_after_warmup={report['compiles_after_warmup']}")
    return 0 if report["compiles_after_warmup"] == 0 else 3


# ---------------------------------------------------------------------------------------- misc


def random_prompt(rng: np.random.Generator, length: int, vocab_size: int) -> list[int]:
    """Random token ids in [10, vocab - 10) (keeps clear of special ids at either end)."""
    lo, hi = (10, vocab_size - 10) if vocab_size > 40 else (0, vocab_size)
    return [int(t) for t in rng.integers(lo, hi, size=length)]


def sharegpt_lengths(n: int, seed: int) -> tuple[tuple[int, int], ...]:
    """Synthetic ShareGPT-like (input, output) lengths: lognormal, fixed seed, clipped to [4, 1024].

    Medians about 150 input and 200 output tokens with long tails (the shape of the ShareGPT
    conversations vLLM's benchmark samples); not the dataset itself (nothing is downloaded).
    """
    rng = np.random.default_rng(seed + 7919)
    ins = np.clip(np.round(rng.lognormal(np.log(150), 1.0, n)), 4, 1024).astype(int)
    outs = np.clip(np.round(rng.lognormal(np.log(200), 0.8, n)), 4, 1024).astype(int)
    return tuple((int(i), int(o)) for i, o in zip(ins, outs))


_ENGINE_FLAGS = ("model", "load_format", "dtype", "max_num_seqs", "max_num_batched_tokens",
                 "max_model_len", "page_size", "num_pages", "gpu_memory_utilization",
                 "attention_impl", "compilation_cache_dir", "token_buckets", "seq_buckets", "seed",
                 "data_parallel_size")


def engine_flag_argv(args: argparse.Namespace) -> list[str]:
    """The command-line form of the `add_engine_flags` values in `args` (to start a server)."""
    out: list[str] = []
    for name in _ENGINE_FLAGS:
        v = getattr(args, name, None)
        if v is None:
            continue
        flag = "--" + name.replace("_", "-")
        out += [flag, ",".join(str(x) for x in v) if isinstance(v, tuple) else str(v)]
    for name in ("no_prefix_caching", "enable_penalties", "sync_engine"):
        if getattr(args, name, False):
            out.append("--" + name.replace("_", "-"))
    return out


def percentiles(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """mean, p50, p90, p99 of `values` times `scale` (None when empty)."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, np.float64) * scale
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if commit and dirty.returncode == 0 and dirty.stdout.strip():
            commit += "+dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata(bench: str, *, with_device: bool = True) -> dict[str, Any]:
    """Device, versions, date (UTC), exact command, git commit.

    Args:
      with_device: False in processes that must not initialise jax on the accelerator (the
        serving load generator); the server fills in its device.
    """
    meta: dict[str, Any] = {"bench": bench}
    if with_device:
        import jax
        import jaxlib

        dev = jax.devices()[0]
        meta.update(device=dev.device_kind, platform=dev.platform,
                    num_devices=jax.device_count(), jax=jax.__version__,
                    jaxlib=getattr(jaxlib, "__version__", None))
    return {
        **meta,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "git_commit": git_commit(),
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("XLA_", "JAX_", "TF_CPP")) or k == "CUDA_VISIBLE_DEVICES"},
    }


def write_json(path: str | None, report: dict[str, Any]) -> None:
    """Writes the report (and always prints where)."""
    if not path:
        return
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=2, default=_json_default))
    print(f"wrote {p}", flush=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def fmt(x: float | None, digits: int = 2) -> str:
    """A number for summary tables; '-' when missing."""
    return "-" if x is None else f"{x:.{digits}f}"
