"""Shared pieces of the end-to-end benchmarks (latency.py, throughput.py, serving.py).

What lives here:
  * `add_engine_flags` / `build_engine`: one engine per benchmark process, built from its parts
    (load_model -> ModelRunner -> Engine), exactly what `Engine.from_config` does, with three
    benchmark choices made explicit and recorded in every JSON: no tokenizer (dummy 8B weights come
    from a config.json-only directory; token-id prompts need none), no penalty-history programs
    (halves warm-up compiles; the benchmarks use temperature 0 without penalties), and chosen
    shape buckets (each bucket is one compile of the whole model, tens of seconds at 8B).
  * `TimedRunner`: a transparent proxy around the runner that timestamps every `execute` call, so
    the host time between device calls (device idle time) is measured, not guessed.
  * `measure_ceilings`: copy bandwidth and bf16 matmul rate measured in the same process
    (bench/common.py helpers when present).
  * `ModelCost`: bytes and FLOPs of a Llama-family decoder for rooflines.
  * `run_metadata`, `engine_summary`, `percentiles`, `write_json`.

bench/ is not a package: the scripts import this module as `e2e_common` (the script's own
directory is first on sys.path when run as ``python bench/<name>.py``). Never imported by package
code.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
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

    dispatch_start: float  # execute_async / execute entered
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
    """Wraps a runner; records host timestamps of every `execute_async` / `execute` call.

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

    def execute(self, inputs: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = self._runner.execute(inputs, **kwargs)
        end = time.perf_counter()
        rec = self._record(inputs, start, start)
        rec.result_call, rec.result_return = start, end
        return out

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

    engine: Any  # xlaserve.runtime.engine.Engine
    timed: TimedRunner  # the runner proxy the engine calls
    model_config: Any  # ModelConfig
    params: Any
    info: dict[str, Any]  # recorded in the JSON: build path, timings, warm-up


def build_engine(args: argparse.Namespace, *, max_model_len: int,
                 warmup_buckets: Sequence[tuple[int, int]] | None = None) -> BuiltEngine:
    """Loads the model, builds the runner with the chosen buckets, warms up, builds the Engine.

    Args:
      args: parsed `add_engine_flags` flags.
      max_model_len: used when --max-model-len is not given.
      warmup_buckets: (T, S) pairs to compile; None: every bucket pair of the runner.
    Raises:
      ValueError: bad bucket lists (names the flag).
    """
    from xlaserve.checkpoints.loader import load_model
    from xlaserve.engine_args import engine_config_from_options
    from xlaserve.runtime.engine import Engine
    from xlaserve.runtime.model_runner import ModelRunner

    load_format = resolve_load_format(args.model, args.load_format)
    options = dict(
        load_format=load_format, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len or max_model_len, page_size=args.page_size,
        num_pages=args.num_pages, gpu_memory_utilization=args.gpu_memory_utilization,
        attention_impl=args.attention_impl, compilation_cache_dir=args.compilation_cache_dir,
        seed=args.seed)
    if args.no_prefix_caching:
        options["enable_prefix_caching"] = False
    config = engine_config_from_options(args.model, **options)
    if config.parallel.world_size != 1:
        raise ValueError("tensor_parallel_size: the e2e benchmarks run on one device "
                         "(bench/tp_scaling.py covers meshes)")
    t0 = time.perf_counter()
    loaded = load_model(config.model, load_format=config.load_format, dtype=config.dtype,
                        seed=config.seed)
    import jax

    jax.block_until_ready(loaded.params)
    load_s = time.perf_counter() - t0

    runner_kw: dict[str, Any] = {}
    sig = inspect.signature(ModelRunner.__init__).parameters
    if "enable_penalties" in sig:
        runner_kw["enable_penalties"] = bool(args.enable_penalties)
    bucket_how = "runner default (powers of two)"
    if args.token_buckets or args.seq_buckets:
        if "token_buckets" in sig and "seq_buckets" in sig:
            runner_kw["token_buckets"] = args.token_buckets
            runner_kw["seq_buckets"] = args.seq_buckets
            bucket_how = "ModelRunner(token_buckets=, seq_buckets=)"
        else:
            bucket_how = "set on the runner before warm-up (ModelRunner has no bucket argument)"
    runner = ModelRunner(loaded.config, loaded.params, config.cache, config.scheduler,
                         attention_impl=config.attention_impl,
                         compilation_cache_dir=config.compilation_cache_dir, **runner_kw)
    if bucket_how.startswith("set on the runner"):
        _override_buckets(runner, args, config)
    t0 = time.perf_counter()
    compiled: list[dict[str, Any]] = []

    def progress(done: int, total: int, key: tuple[int, int, int], record: Any) -> None:
        compiled.append({"T": key[0], "S": key[1], "W": key[2],
                         "lower_s": round(float(record.lower_s), 3),
                         "compile_s": round(float(record.compile_s), 3),
                         "cache_hit": record.cache_hit})
        print(f"[warm-up] {done}/{total} T={key[0]} S={key[1]} W={key[2]} "
              f"compile {record.compile_s:.1f}s cache_hit={record.cache_hit}", flush=True)

    runner.warmup(warmup_buckets, progress=progress)
    warmup_s = time.perf_counter() - t0
    timed = TimedRunner(runner)
    engine_kw: dict[str, Any] = {}
    if "async_scheduling" in inspect.signature(Engine.__init__).parameters:
        engine_kw["async_scheduling"] = not args.sync_engine
    elif args.sync_engine:
        raise ValueError("--sync-engine: this Engine has no async_scheduling option")
    engine = Engine(config, timed, tokenizer=None, model_config=loaded.config, **engine_kw)
    info = {
        "engine_build": "load_model -> ModelRunner -> warmup -> Engine(tokenizer=None) "
                        "(Engine.from_config always loads a tokenizer and compiles the penalty "
                        "programs; the benchmarks need neither)",
        "load_format": load_format, "tokenizer": None,
        "enable_penalties": runner_kw.get("enable_penalties", True),
        "buckets_set_by": bucket_how,
        "load_s": round(load_s, 2), "warmup_s": round(warmup_s, 2),
        "warmup_programs": compiled,
    }
    return BuiltEngine(engine, timed, loaded.config, loaded.params, info)


def _override_buckets(runner: Any, args: argparse.Namespace, config: Any) -> None:
    """Replaces the runner's bucket lists (validated) before warm-up."""
    sched = config.scheduler
    if args.token_buckets:
        tb = tuple(args.token_buckets)
        if list(tb) != sorted(set(tb)) or tb[-1] != sched.max_num_batched_tokens or tb[0] < 1:
            raise ValueError(f"--token-buckets={tb}: must be ascending, distinct, and end at "
                             f"max_num_batched_tokens={sched.max_num_batched_tokens}")
        runner.token_buckets = tb
    if args.seq_buckets:
        sb = tuple(args.seq_buckets)
        if list(sb) != sorted(set(sb)) or sb[-1] < sched.max_num_seqs or sb[0] < 1:
            raise ValueError(f"--seq-buckets={sb}: must be ascending, distinct, the last >= "
                             f"max_num_seqs={sched.max_num_seqs}")
        runner.seq_buckets = sb


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
        "history_widths": list(getattr(r, "history_widths", ())),
        "async_scheduling": getattr(e, "async_scheduling", False),
        **built.info,
    }


def compiles_after_warmup(built: BuiltEngine) -> int:
    """From the engine's stats (the runner's recompile guard)."""
    return int(built.engine.stats().compiles_after_warmup)


# ---------------------------------------------------------------------------------------- ceilings


def measure_ceilings(skip: bool = False) -> dict[str, Any]:
    """Copy bandwidth (read + write bytes) and bf16 matmul rate measured on this device now.

    GPU: a 2 GiB elementwise copy and 8192^3 bf16 matmuls; CPU: 64 MiB and 512^3 (smoke runs).
    """
    import jax

    if skip:
        return {"measured": False}
    on_cpu = jax.devices()[0].platform == "cpu"
    copy_bytes = (64 << 20) if on_cpu else (2 << 30)
    dim = 512 if on_cpu else 8192
    try:
        import common  # bench/common.py (same directory as the scripts)

        bw = float(common.copy_bandwidth(copy_bytes))
        rate = float(common.matmul_rate(dim))
        how = "bench/common.py copy_bandwidth (x+1 over bf16) / matmul_rate (bf16, f32 acc)"
    except (ImportError, AttributeError):
        from xlaserve.runtime import hardware

        dev = jax.devices()[0]
        bw = hardware.measure_copy_bandwidth(dev, copy_bytes)
        rate = hardware.measure_matmul_rate(dev, dim, "bfloat16")
        how = "xlaserve.runtime.hardware measure_copy_bandwidth / measure_matmul_rate"
    out: dict[str, Any] = {"measured": True, "copy_bytes_per_s": bw,
                           "matmul_bf16_flops_per_s": rate, "copy_bytes": copy_bytes,
                           "matmul_dim": dim, "how": how}
    try:
        from xlaserve.runtime import hardware

        peaks = hardware.peaks_for_device(jax.devices()[0])
        out["datasheet"] = {"name": peaks.name, "memory_bytes_per_s": peaks.memory_bytes_per_s,
                            "bf16_flops_per_s": peaks.bf16_flops_per_s}
    except (ImportError, ValueError):
        pass
    return out


# ---------------------------------------------------------------------------------------- costs


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Bytes and FLOPs of one Llama-family decoder, from its config (no arrays).

    Matmul FLOPs count 2 per multiply-add. Logits are computed for one row per sequence only
    (the runner samples `logits_indices`), so the vocab projection costs 2*D*V per sequence, not
    per token. Decode reads every weight except the embedding table (only the looked-up rows).
    """

    layer_matmul_params: int  # per token, all layers: q, k, v, o, gate, up, down
    lm_head_params: int  # D * V
    embed_params: int  # V * D (a separate table unless tied)
    other_params: int  # norms, biases
    itemsize: int
    kv_bytes_per_token: int  # K and V, all layers
    attn_flops_per_query_key: int  # 4 * N * H * layers: QK^T and PV for one (query, key) pair

    @classmethod
    def from_config(cls, cfg: Any) -> ModelCost:
        d, f, n, k, h, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                            cfg.num_kv_heads, cfg.head_dim, cfg.num_layers)
        per_layer = d * (n + 2 * k) * h + n * h * d + 3 * d * f
        other = L * 2 * d + d + (L * (n + 2 * k) * h if cfg.attention_bias else 0) + (
            L * 2 * h if cfg.qk_norm else 0)
        itemsize = 4 if cfg.dtype == "float32" else 2
        return cls(layer_matmul_params=L * per_layer, lm_head_params=d * cfg.vocab_size,
                   embed_params=0 if cfg.tie_word_embeddings else cfg.vocab_size * d,
                   other_params=other, itemsize=itemsize,
                   kv_bytes_per_token=cfg.kv_bytes_per_token,
                   attn_flops_per_query_key=4 * n * h * L)

    @property
    def total_params(self) -> int:
        return self.layer_matmul_params + self.lm_head_params + self.embed_params + \
            self.other_params

    @property
    def step_weight_bytes(self) -> int:
        """Weights one step must read (the embedding table only by rows: not counted)."""
        return (self.layer_matmul_params + self.lm_head_params + self.other_params) * \
            self.itemsize

    def step_cost(self, q_lens: Sequence[int], kv_lens: Sequence[int]) -> tuple[float, float]:
        """(FLOPs, minimum bytes) of one step with these sequences.

        Args:
          q_lens: new tokens per sequence this step.
          kv_lens: tokens in the cache per sequence after the step (new ones included).
        """
        tokens = sum(q_lens)
        flops = 2.0 * self.layer_matmul_params * tokens + 2.0 * self.lm_head_params * len(q_lens)
        for q, kv in zip(q_lens, kv_lens):  # causal: query i of the chunk sees kv - q + i + 1 keys
            keys = q * (kv - q) + q * (q + 1) / 2
            flops += self.attn_flops_per_query_key * keys
        kv_read = sum(kv - q for q, kv in zip(q_lens, kv_lens)) * self.kv_bytes_per_token
        kv_write = tokens * self.kv_bytes_per_token
        return flops, float(self.step_weight_bytes + kv_read + kv_write)


def roofline(flops: float, num_bytes: float, ceilings: dict[str, Any]) -> dict[str, Any] | None:
    """max(bytes / copy bandwidth, FLOPs / matmul rate), with both parts and the bound."""
    if not ceilings.get("measured"):
        return None
    mem_s = num_bytes / ceilings["copy_bytes_per_s"]
    compute_s = flops / ceilings["matmul_bf16_flops_per_s"]
    return {"seconds": max(mem_s, compute_s), "memory_s": mem_s, "compute_s": compute_s,
            "bound": "memory" if mem_s >= compute_s else "compute", "flops": flops,
            "bytes": num_bytes}


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
                 "attention_impl", "compilation_cache_dir", "token_buckets", "seq_buckets", "seed")


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


# ---------------------------------------------------------------------------------------- summary


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


if __name__ == "__main__":
    _p = argparse.ArgumentParser(description="Summarise one run's JSON: "
                                 "python bench/e2e_common.py summary DIR [--markdown]")
    _p.add_argument("command", choices=["summary"])
    _p.add_argument("results_dir")
    _p.add_argument("--markdown", action="store_true")
    _a = _p.parse_args()
    print_summary(_a.results_dir, _a.markdown)
