"""Drives one `xlaserve profile` run: build the runner, warm it up, analyze, time, replay.

The runner is built the way `Engine.from_config` builds it (load_model with the same sharding
plan, then `ModelRunner`), and every bucket compiles through `ModelRunner.warmup`, the engine's
own warm-up, whose `CompileRecord`s are then analyzed (runtime/profile.py). `--check-recompiles`
wraps that same runner in a real `Engine` and replays random requests under a `CompileMonitor`.

The result is one JSON-able dict (`profile` returns it; render.py draws it):
  xlaserve, jax, device{platform, device_kind, count, backend}, peaks (DevicePeaks),
  config (EngineConfig), model (ModelConfig), runner{token_buckets, seq_buckets, history_widths,
  num_pages, page_size, max_pages_per_seq, compilation_cache_dir}, run{enabled, repeats, kv_len},
  buckets[] (BucketProfile.to_json), summary (ModelSummary.to_json), recompiles (None, or
  {num_requests, num_steps, seed, forced_shape, compiles_after_warmup[{fun_name, shapes,
  seconds}], runner_compile_log[{shapes, num_compiles}], runner_compiles_after_warmup}),
  xla_flags{XLA_FLAGS, set_by_xlaserve, not_set, late, disabled} (runtime/xla_flags.py),
  all_reduce (what reduces the row-parallel projections at tp > 1, sharding/specs.py),
  not_available[] (what this platform cannot show or run, one sentence each; on a GPU with
  datasheet peaks only jax's deprecation of the Pallas Triton backend, from jax 0.11).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import xlaserve
from xlaserve.runtime import profile as prof
from xlaserve.runtime import xla_flags
from xlaserve.runtime.batch import StepInputs
from xlaserve.runtime.config import EngineConfig
from xlaserve.pallas_kernels import ops, pdl
from xlaserve.runtime.hardware import DevicePeaks
from xlaserve.sharding.specs import describe_all_reduce

Bucket = tuple[int, int]


def build_runner(cfg: EngineConfig, *, enable_penalties: bool = True) -> tuple[Any, Any]:
    """(ModelRunner, LoadedModel) exactly as `Engine.from_config` makes them, without warm-up.

    `enable_penalties=False` compiles programs without the penalty history (a profiling shortcut).
    """
    from xlaserve.runtime.engine import Engine

    return Engine.build_runner(cfg, enable_penalties=enable_penalties)


def attention_choice(requested: str, num_tokens: int, num_seqs: int) -> str:
    """What the dispatcher picks for this bucket: implementation, and tile class for Pallas."""
    from xlaserve.pallas_kernels import ops

    chosen = ops.resolve_impl(requested)
    if chosen == "reference":
        return chosen
    from xlaserve.pallas_kernels.tuning import q_len_class

    return f"{chosen}:{q_len_class(num_tokens, num_seqs)}"


def timing_inputs(runner: Any, num_tokens: int, num_seqs: int, width: int,
                  kv_len: int) -> StepInputs:
    """A full bucket for --run: S sequences sharing T tokens, each with `kv_len` tokens of context.

    Page ids cycle over the pool (1..P-1), so sequences may share pages: the values are garbage,
    the work is that of a real step of this shape.
    """
    t, s = num_tokens, num_seqs
    L, m = runner.page_size, runner.max_pages_per_seq
    q_lens = np.full(s, t // s, np.int64)
    q_lens[: t % s] += 1
    q_lens = np.minimum(q_lens, m * L)  # a sequence holds at most max_model_len (rest: padding)
    kv_lens = np.clip(np.maximum(q_lens, kv_len), 1, m * L)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    pages = np.arange(s * m, dtype=np.int64).reshape(s, m) % (runner.num_pages - 1) + 1
    page_table = pages.astype(np.int32)
    positions = np.concatenate([np.arange(k - q, k) for q, k in zip(q_lens, kv_lens)])
    seq_of = np.repeat(np.arange(s), q_lens)
    n = len(positions)  # rows past n are padding: position 0, slot 0 (page 0)
    pad = np.zeros(t - n, np.int64)
    slots = np.concatenate([page_table[seq_of, positions // L] * L + positions % L, pad])
    base = runner.dummy_inputs(t, s, width)
    return dataclasses.replace(
        base, token_ids=(np.arange(t) % runner.model_cfg.vocab_size).astype(np.int32),
        positions=np.concatenate([positions, pad]).astype(np.int32),
        slot_mapping=slots.astype(np.int32), cu_q_lens=cu, kv_lens=kv_lens.astype(np.int32),
        page_table=page_table,
        num_seqs=np.array([s], np.int32), logits_indices=(cu[1:] - 1).astype(np.int32))


def median_seconds(fn: Any, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn() after one warm-up call; fn must block."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats!r}: must be >= 1")
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _progress(enabled: bool) -> tuple[Any, Callable[..., None] | None]:
    """A rich progress bar on a terminal, one plain stderr line per compile otherwise."""
    if not enabled:
        return None, None
    if not sys.stderr.isatty():
        def line(done: int, total: int, key: tuple[int, int, int], record: Any) -> None:
            hit = {True: "cache hit", False: "compiled", None: "no cache"}[record.cache_hit]
            print(f"[{done}/{total}] T={key[0]} S={key[1]} W={key[2]}: {hit}, lower "
                  f"{record.lower_s:.2f}s, compile {record.compile_s:.2f}s", file=sys.stderr,
                  flush=True)
        return None, line
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.progress import TimeElapsedColumn

    bar = Progress(TextColumn("compiling {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=Console(file=sys.stderr), transient=False)
    task = bar.add_task("buckets", total=None)

    def update(done: int, total: int, key: tuple[int, int, int], record: Any) -> None:
        t, s, w = key
        hit = {True: "cache hit", False: "compiled", None: "no cache"}[record.cache_hit]
        bar.update(task, completed=done, total=total,
                   description=f"T={t} S={s} W={w} ({hit} in {record.compile_s:.2f}s)")
    return bar, update


def replay_random_requests(engine: Any, num_requests: int, seed: int) -> int:
    """Feeds `num_requests` random requests to `engine` in waves and steps until it is idle.

    Prompt lengths, output lengths, sampling settings (greedy, temperature/top-k/top-p,
    penalties, logprobs) are drawn at random within the engine's limits. Returns the step count.
    """
    from xlaserve.runtime.request import SamplingParams

    rng = random.Random(seed)
    sched = engine.config.scheduler
    vocab = engine.model_config.vocab_size
    max_prompt = max(1, min(sched.max_model_len - 1, 3 * sched.max_num_batched_tokens))
    pending = []
    for i in range(num_requests):
        prompt_len = rng.randint(1, max_prompt)
        max_tokens = rng.randint(1, max(1, min(24, sched.max_model_len - prompt_len)))
        sp = SamplingParams(
            max_tokens=max_tokens, ignore_eos=True, seed=rng.randrange(2**31),
            temperature=rng.choice([0.0, 0.7, 1.0]), top_k=rng.choice([0, 5, 50]),
            top_p=rng.choice([1.0, 0.9]),
            repetition_penalty=rng.choice([1.0, 1.0, 1.2]),
            logprobs=rng.choice([None, None, 0, 3]))
        pending.append((f"replay-{i}", [rng.randrange(vocab) for _ in range(prompt_len)], sp))
    steps, limit = 0, 1000 + num_requests * (sched.max_model_len + 32)
    while pending or engine.has_work():
        for _ in range(rng.randint(0, 3) if engine.has_work() else 1):  # staggered arrivals
            if pending:
                engine.add_request(*pending.pop(0))
        engine.step()
        steps += 1
        if steps > limit:
            raise RuntimeError(f"replay: engine still busy after {limit} steps")
    return steps


def check_recompiles(runner: Any, loaded: Any, cfg: EngineConfig, num_requests: int, seed: int,
                     force_shape: Bucket | None) -> dict[str, Any]:
    """Replays random requests through an Engine on `runner`; lists every compile after warm-up.

    `force_shape` (a test hook) runs one extra step padded to that (T, S) afterwards.
    """
    from xlaserve.runtime.engine import Engine

    engine = Engine(cfg, runner, model_config=loaded.config)
    before = len(runner.compile_log)
    with prof.CompileMonitor() as monitor:
        steps = replay_random_requests(engine, num_requests, seed)
        if force_shape is not None:
            runner.execute(runner.dummy_inputs(*force_shape))
            steps += 1
    runner_log = [{"shapes": c.shapes, "num_compiles": c.num_compiles}
                  for c in runner.compile_log[before:]]
    return {"num_requests": num_requests, "num_steps": steps, "seed": seed,
            "forced_shape": list(force_shape) if force_shape else None,
            "compiles_after_warmup": [dataclasses.asdict(c) for c in monitor.compiles],
            "runner_compile_log": runner_log,
            "runner_compiles_after_warmup": int(runner.compiles_after_warmup)}


def _device_json() -> dict[str, Any]:
    devices = jax.devices()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "count": len(devices), "backend": jax.default_backend()}


def _device_memory() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def not_available(cfg: EngineConfig, peaks: DevicePeaks, report: dict[str, Any]) -> list[str]:
    """What this platform cannot show or run, so that nothing falls back silently (e.g. on CPU)."""
    from xlaserve.pallas_kernels import ops

    platform = report["device"]["platform"]
    notes = []
    if cfg.attention_impl == "auto" and ops.resolve_impl("auto", platform) == "reference":
        reason = ops.available_implementations(platform)["pallas_triton"]
        notes.append(f"attention: the Pallas kernel (pallas_triton) {reason}; --attention-impl "
                     "auto ran the pure-jnp reference, so the attention costs are not the "
                     "kernel's")
    elif "deprecates" in ops.available_implementations(platform)["pallas_triton"]:
        notes.append("attention: the Pallas kernel (pallas_triton) is "
                     + ops.available_implementations(platform)["pallas_triton"])
    if cfg.decode_gemm == "auto" and ops._platform(platform) != "gpu":
        notes.append("decode GEMMs: " + ops.describe_skinny_gemm("auto", platform))
    if ops._platform(platform) == "gpu" and report.get("early_launch", "").startswith("off: "):
        notes.append("early launch of dependents (PDL) from the Pallas kernels: "
                     + report["early_launch"][len("off: "):])
    if peaks.source == "nominal":
        notes.append(f"peaks: {peaks.name} holds nominal round numbers, not this machine's: "
                     "roofline times and measured/roofline ratios are placeholders "
                     "(--calibrate measures this machine)")
    if report["summary"].get("device_memory_bytes") is None:
        notes.append(f"device memory: {platform} reports no limit, so whether the largest step "
                     "fits is unknown")
    if report.get("all_reduce", "").startswith("XLA's collective (xlaserve's kernel cannot run"):
        notes.append(f"tensor parallelism: {report['all_reduce']}; every decode step ends a "
                     "CUDA graph at each all-reduce")
    flags = report["xla_flags"]
    if platform != "gpu" and flags and flags.get("set_by_xlaserve"):
        notes.append(f"XLA defaults: {' '.join(flags['set_by_xlaserve'])}: GPU-only XLA flags, "
                     f"no effect on {platform}")
    return notes


def profile(cfg: EngineConfig, peaks: DevicePeaks, args: argparse.Namespace,
            choose_buckets: Callable[[list[str] | None, list[Bucket]], list[Bucket]],
            force_shape: Bucket | None, *, show_progress: bool = True) -> dict[str, Any]:
    """Runs the whole profile and returns the report dict (see the module docstring).

    Raises:
      UsageError: the model does not load (no weights, a broken checkpoint).
    """
    from xlaserve.cli import UsageError

    try:
        runner, loaded = build_runner(cfg, enable_penalties=not args.no_penalty_programs)
    except ValueError as e:
        raise UsageError(str(e)) from e
    buckets = choose_buckets(args.buckets, runner.bucket_keys())
    bar, update = _progress(show_progress)
    if bar is not None:
        bar.start()
    try:
        runner.warmup(buckets, progress=update)
    finally:
        if bar is not None:
            bar.stop()
    dtype = loaded.config.dtype
    widths = sorted(runner.history_widths)
    records = [((t, s, w), runner.compile_records[(t, s)]) for t, s in buckets for w in widths]
    profiles: list[prof.BucketProfile] = []
    m = loaded.config
    kv_copies = runner.kv_cache_heads // m.num_kv_heads  # tp / K when tp > K (one per device)
    kv_bytes_per_token = (prof.tree_bytes(runner.kv_cache) // kv_copies
                          // (runner.num_pages * runner.page_size))
    kv_len = args.run_kv_len or runner.sched_cfg.max_model_len // 2
    for (t, s, w), rec in records:
        bp = prof.analyze_compiled(t, s, compiled=rec.compiled,
                                   lower_s=rec.lower_s, compile_s=rec.compile_s,
                                   cache_hit=rec.cache_hit, peaks=peaks, dtype=dtype,
                                   attention_impl=attention_choice(cfg.attention_impl, t, s),
                                   history_width=w)
        if bp.attention_impl.startswith("pallas_triton"):  # opaque to XLA's cost analysis
            flops, nbytes = prof.attention_cost(
                num_tokens=t, num_seqs=s, kv_len=kv_len,
                max_model_len=runner.sched_cfg.max_model_len, num_layers=m.num_layers,
                num_heads=m.num_heads, head_dim=m.head_dim,
                kv_bytes_per_token=kv_bytes_per_token)
            prof.add_attention_estimate(bp, flops, nbytes, peaks, dtype)
        if args.run:
            inputs = timing_inputs(runner, t, s, w, kv_len)
            bp.measured_s = median_seconds(lambda inputs=inputs: runner.execute(inputs),
                                           args.repeats)
            bp.measured_over_roofline = bp.measured_s / bp.roofline_s if bp.roofline_s else None
        mflops, mbytes = prof.model_cost(
            num_tokens=t, num_seqs=s, kv_len=kv_len, max_model_len=runner.sched_cfg.max_model_len,
            num_layers=m.num_layers, num_heads=m.num_heads, head_dim=m.head_dim,
            hidden_size=m.hidden_size, vocab_size=m.vocab_size,
            tie_word_embeddings=m.tie_word_embeddings, num_params=prof.tree_size(runner.params),
            param_bytes=prof.tree_bytes(runner.params), kv_bytes_per_token=kv_bytes_per_token)
        prof.add_model_roofline(bp, mflops, mbytes, peaks, dtype)
        if args.dump_hlo:
            out = pathlib.Path(args.dump_hlo)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"step_T{t}_S{s}_W{w}.hlo.txt").write_text(rec.compiled.as_text())
            (out / f"step_T{t}_S{s}_W{w}.stablehlo.mlir").write_text(rec.lowered.as_text())
        profiles.append(bp)
    summary = prof.model_summary(
        params=runner.params, kv_cache=runner.kv_cache, num_pages=runner.num_pages,
        page_size=runner.page_size, max_model_len=runner.sched_cfg.max_model_len,
        max_num_seqs=runner.sched_cfg.max_num_seqs, profiles=profiles,
        device_memory_bytes=_device_memory(), kv_copies=kv_copies)
    report: dict[str, Any] = {
        "xlaserve": xlaserve.__version__, "jax": jax.__version__, "device": _device_json(),
        "peaks": peaks.to_json(), "config": dataclasses.asdict(cfg),
        "model": dataclasses.asdict(m),
        "runner": {"token_buckets": list(runner.token_buckets),
                   "seq_buckets": list(runner.seq_buckets),
                   "history_widths": list(runner.history_widths),
                   "num_pages": runner.num_pages, "page_size": runner.page_size,
                   "max_pages_per_seq": runner.max_pages_per_seq,
                   "compilation_cache_dir": runner.compilation_cache_dir},
        "run": {"enabled": bool(args.run), "repeats": args.repeats, "kv_len": kv_len},
        "buckets": [p.to_json() for p in profiles],
        "summary": summary.to_json(),
        "recompiles": None,
        "xla_flags": xla_flags.report(),
        "all_reduce": describe_all_reduce(runner.mesh, runner.row_parallel_fn,
                                          cfg.parallel.all_reduce),
        "decode_gemm": ops.describe_skinny_gemm(cfg.decode_gemm),
        "early_launch": pdl.describe(),
    }
    report["not_available"] = not_available(cfg, peaks, report)
    if args.check_recompiles:
        report["recompiles"] = check_recompiles(runner, loaded, cfg, args.check_recompiles,
                                                args.replay_seed, force_shape)
    return report
