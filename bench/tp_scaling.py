"""Tensor-parallel scaling: decode and prefill step time of an 8B-shaped model at tp = 1, 2, 4.

For each tp the script builds the ("data", "model") mesh and sharding plan
(`sharding.specs.ShardingPlan`), makes dummy weights directly on their shards (a jitted
`init_params` with out_shardings: the same values at every tp, since threefry is partitionable),
a sharded KV cache, and compiles one step program per shape: `llama.forward` with the shard_map'd
attention, then a greedy argmax on device, with explicit in/out shardings and the cache donated
(what ModelRunner compiles, minus the sampler's extras). Inputs are put on the devices once, so
the times are device step times, not host batch building.

Measured per tp:
  * decode: B sequences, one new token each, C tokens of context (``--decode-batches``,
    ``--context``); median ms per step over back-to-back steps (``--iters`` of them, so the
    first launch's latency counts 1/iters), and the steady-state step (``step_ms_slope``): the
    difference of ``--slope-iters`` and ``--iters`` step runs over their step count, with no
    launch latency in it (session 22: 2.77 against 2.92 ms at tp=2, 4.39 against 4.62 at tp=1).
  * prefill: one sequence of ``--prefill-tokens`` tokens.
  * per-device step time: steps launched one at a time while every device's copy of the output
    is polled, so each device's finish time is seen; the spread is max - min over devices of
    their median times (stragglers and imbalance show here).
  * scaling: speedup = t(tp=1) / t(tp) and efficiency = speedup / tp (relative to the smallest
    tp given when 1 is not in ``--tp``).
Each tp runs in its own child process (``--in-process`` runs them all here): on one 2 x H200 and
one 4 x H200 host, building a second mesh in a process that had run another tp stalled (session 4
logs in bench/results/session4_*), while each tp alone ran. The parent merges the children's JSON.
Self-checks (bench/tp_report.py), recorded in the JSON (``--strict`` exits 1 when one fails):
the params are really split (shard shapes), their per-leaf checksums equal the first tp's (same
weights), a greedy continuation of a random prompt (prefill then ``--greedy-steps`` decode steps,
through the same compiled programs) gives the same tokens as the first tp, and the step compiled
once.
``decode_b1_speedup_tp2`` and ``meets_1p6x_decode_b1_tp2`` report the issue's bar.

  python bench/tp_scaling.py --tp 1 2 --out $OUT/tp.json                 # 8B dummy, H200s
  python bench/tp_scaling.py --tp 1 2 4 --decode-batches 1 32 --out $OUT/tp.json
  python bench/tp_scaling.py --tp 1 --shard-of 2 --decode-batches 1 --out $OUT/shard.json
                                     # tp=2's per-device step on ONE GPU (shard_config)
  JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python bench/tp_scaling.py --model tiny --tp 1 2 4 --out /tmp/tp.json  # CPU smoke

Batch-1 decode at tp > 1 is host-bound (measured with ``--trace-dir`` on H200s, BENCHMARKS.md
section 0a): the 2 all-reduces per layer (65 for 32 layers) cut the step into 66 CUDA graphs, and
each device's XLA executor thread spends longer launching and updating them than the device
computes. ``--xla-flags`` passes XLA settings to try (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import pathlib
import platform
import re
import statistics
import sys
import time
from typing import Any

import xlaserve  # noqa: F401  (first: sets xlaserve's default XLA flags)
import jax
import jax.numpy as jnp
import numpy as np

import trace_summary  # bench/
from tp_report import checks, scaling, summarize  # bench/

from xlaserve.checkpoints import hf
from xlaserve.pallas_kernels import ops
from xlaserve.runtime.batch import StepInputs
from xlaserve.runtime.compile_cache import setup_compilation_cache
from xlaserve.runtime.config import ModelConfig, ParallelConfig
from xlaserve.runtime.models import llama
from xlaserve.sharding.specs import ShardingPlan

DEFAULT_MODEL = str(pathlib.Path(__file__).parent / "configs" / "llama3.1-8b")
TINY = ModelConfig(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
                   num_layers=2, num_heads=8, num_kv_heads=2, head_dim=16,
                   max_position_embeddings=4096, dtype="float32")
MIN_TOKENS, MIN_SEQS = 16, 8  # the runner's smallest buckets


def pow2_at_least(n: int, lo: int) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def step_inputs(q_lens: list[int], kv_lens: list[int], *, page_size: int, pages_per_seq: int,
                rng: np.random.Generator, vocab: int, tokens: list[int] | None = None,
                ) -> StepInputs:
    """A padded step: sequence s owns pages 1 + s*pages_per_seq ... (page 0 = padding)."""
    t_bucket = pow2_at_least(sum(q_lens), MIN_TOKENS)
    s_bucket = pow2_at_least(len(q_lens), MIN_SEQS)
    tok, pos, slot, cu = [], [], [], [0]
    table = np.zeros((s_bucket, pages_per_seq), np.int32)
    for s, (q, kv) in enumerate(zip(q_lens, kv_lens, strict=True)):
        pages = 1 + s * pages_per_seq + np.arange(pages_per_seq)
        table[s] = pages
        for p in range(kv - q, kv):
            pos.append(p)
            slot.append(int(pages[p // page_size]) * page_size + p % page_size)
        cu.append(cu[-1] + q)
    tok = list(tokens) if tokens is not None else rng.integers(0, vocab, len(pos)).tolist()
    pad_t, pad_s = t_bucket - len(pos), s_bucket - len(q_lens)
    cu_arr = np.array(cu + [cu[-1]] * pad_s, np.int32)
    return StepInputs(
        token_ids=np.array(tok + [0] * pad_t, np.int32),
        positions=np.array(pos + [0] * pad_t, np.int32),
        slot_mapping=np.array(slot + [0] * pad_t, np.int32),
        cu_q_lens=cu_arr, kv_lens=np.array(list(kv_lens) + [0] * pad_s, np.int32),
        page_table=table, num_seqs=np.array([len(q_lens)], np.int32),
        logits_indices=np.maximum(cu_arr[1:] - 1, 0).astype(np.int32))


def make_step_fn(cfg: ModelConfig, plan: ShardingPlan, pad: bool = False):
    """The jitted step: forward + greedy on device -> (tokens i32[S], top2 f32[S, 2], cache).

    pad: the step takes a 4th argument, a replicated bf16 array it sums (one reduce kernel
    reading it from HBM on every device) into top2 times 0: known extra device time per step,
    to see how much of it shows in the step time (none where the step is host-bound)."""
    def step(params: Any, inputs: StepInputs, cache: llama.KVCache, *extra: jax.Array):
        logits, cache = llama.forward(params, inputs, cache, cfg, attention_fn=plan.attention_fn,
                                      row_parallel_fn=plan.row_parallel_fn,
                                      project_fn=plan.project_fn)
        top2 = jax.lax.top_k(logits, 2)[0]  # [S, 2]
        for x in extra:
            top2 = top2 + jnp.sum(x.astype(jnp.float32)) * 0.0
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), top2, cache

    kv = plan.kv_cache_shardings()
    ins = (plan.param_shardings, plan.input_sharding, kv) + ((plan.input_sharding,) if pad else ())
    return jax.jit(step, in_shardings=ins,
                   out_shardings=(plan.input_sharding, plan.input_sharding, kv),
                   donate_argnums=(2,))


class Runner:
    """One tp: plan, params, cache and the compiled programs (one per input shape)."""

    def __init__(self, cfg: ModelConfig, tp: int, num_pages: int, page_size: int,
                 impl: str, copies: int = 1, all_reduce: str = "auto",
                 split_k: int | None = None, decode_gemm: str = "auto",
                 rope_write: bool = True, skip_padding: bool = True, pad_mib: int = 0,
                 replicate_embedding: bool = False) -> None:
        self.plan = ShardingPlan.create(cfg, ParallelConfig(tensor_parallel_size=tp),
                                        attention_impl=impl).with_all_reduce(all_reduce)
        if replicate_embedding:  # A/B: the input embedding whole on every device (no psum)
            shardings = dict(self.plan.param_shardings)
            shardings["embed"] = jax.tree.map(
                lambda s: jax.sharding.NamedSharding(self.plan.mesh, jax.sharding.PartitionSpec()),
                shardings["embed"])
            self.plan = dataclasses.replace(self.plan, param_shardings=shardings)
        rp = self.plan.row_parallel_fn
        if rp is not None and split_k is not None:  # A/B: split-K partials summed in the kernel
            self.plan = dataclasses.replace(
                self.plan, row_parallel_fn=dataclasses.replace(rp, split_k=split_k))
        self.plan = self.plan.with_decode_gemm(decode_gemm)
        # A/B switches of session 13: the q/k/v epilogue kernel (rope + K/V write) and the fused
        # all-reduce skipping the padding rows
        if self.plan.project_fn is not None and not rope_write:
            self.plan = dataclasses.replace(self.plan, project_fn=dataclasses.replace(
                self.plan.project_fn, fuse_rope_write=False))
        if self.plan.row_parallel_fn is not None and not skip_padding:
            self.plan = dataclasses.replace(self.plan, row_parallel_fn=dataclasses.replace(
                self.plan.row_parallel_fn, skip_padding=False))
        # The key is made inside the program: no array crosses devices before the step (a
        # single-device key put onto the mesh stalled on one 2 x H200 host, BENCHMARKS.md).
        self.params = jax.jit(lambda: llama.init_params(cfg, jax.random.key(0)),
                              out_shardings=self.plan.param_shardings)()
        self.cache = self.plan.init_kv_cache(num_pages, page_size)
        # `copies` > 1 compiles each program that many times and calls the copies in turn. XLA
        # keeps CUDA graphs per executable and re-records the commands whose buffers moved; with
        # two steps in flight the temp buffer alternates between two addresses, so one executable
        # updates its graphs every step while two alternating ones may each keep theirs.
        self.copies = copies
        self.pad = (jax.jit(lambda: jnp.ones((pad_mib << 19,), jnp.bfloat16),
                            out_shardings=self.plan.input_sharding)(),) if pad_mib else ()
        self.jitted = [make_step_fn(cfg, self.plan, bool(pad_mib)) for _ in range(copies)]
        self.dispatch_s: list[float] = []  # host time inside each timed run() call
        self.compiled: dict[tuple[int, int, int], Any] = {}
        self.compile_s: dict[str, float] = {}
        self.kernels: dict[str, dict[str, int]] = {}  # per program: our kernels' mentions
        self.calls = 0

    def put(self, inputs: StepInputs) -> StepInputs:
        return jax.device_put(inputs, self.plan.input_sharding)

    def program(self, inputs: StepInputs, copy: int = 0) -> Any:
        key = (inputs.num_tokens_bucket, inputs.num_seqs_bucket, copy)
        if key not in self.compiled:
            start = time.perf_counter()
            self.compiled[key] = self.jitted[copy].lower(self.params, inputs, self.cache,
                                                         *self.pad).compile()
            name = f"T{key[0]}_S{key[1]}" + (f"_copy{copy}" if copy else "")
            self.compile_s[name] = round(time.perf_counter() - start, 2)
            text = self.compiled[key].as_text()  # which of our kernels the program holds
            self.kernels[name] = {k: text.count(k) for k in (
                "skinny_gemm_k", "skinny_gemm_swiglu", "rope_write_kv", "xlaserve_all_reduce")}
            # the all-reduce kernels that find their rank from their output pointer
            self.kernels[name]["all_reduce_rr"] = len(re.findall(r"xlaserve_all_reduce\w*_rr\b",
                                                                 text))
        return self.compiled[key]

    def run(self, inputs: StepInputs) -> tuple[jax.Array, jax.Array]:
        program = self.program(inputs, self.calls % self.copies)
        self.calls += 1
        tokens, top2, self.cache = program(self.params, inputs, self.cache, *self.pad)
        return tokens, top2

    def time_steps(self, inputs: StepInputs, iters: int, repeats: int) -> list[float]:
        """ms per step over `repeats` runs of `iters` back-to-back steps (after 2 warm-ups)."""
        inputs = self.put(inputs)
        for _ in range(2):
            jax.block_until_ready(self.run(inputs))
        self.dispatch_s = []
        return [self._steps_s(inputs, iters, self.dispatch_s) / iters * 1e3
                for _ in range(repeats)]

    def _steps_s(self, inputs: StepInputs, n: int, dispatch: list[float] | None = None) -> float:
        """Seconds for `n` back-to-back steps until the last is ready (each call's host time
        appended to `dispatch`)."""
        start = time.perf_counter()
        res = None
        for _ in range(n):
            t = time.perf_counter()
            res = self.run(inputs)
            if dispatch is not None:
                dispatch.append(time.perf_counter() - t)
        jax.block_until_ready(res)
        return time.perf_counter() - start

    def slope_ms(self, inputs: StepInputs, short: int, long: int, repeats: int) -> list[float]:
        """ms per step from the difference of a `long` and a `short` run of back-to-back steps.

        A run of N steps takes (host time until the first kernel starts) + N x step + (time to
        see the last one finish); time_steps divides all of it by N, so a slow first launch
        shows in its number as launch / N. The slope (T(long) - T(short)) / (long - short) drops
        the constant and is the steady-state step: max(device step, host dispatch per step)."""
        inputs = self.put(inputs)
        jax.block_until_ready(self.run(inputs))
        out = []
        for _ in range(repeats):
            t_short = self._steps_s(inputs, short)
            out.append((self._steps_s(inputs, long) - t_short) / (long - short) * 1e3)
        return out

    def per_device_ms(self, inputs: StepInputs, steps: int) -> dict[str, float]:
        """Median ms from dispatch until each device's copy of the output is ready."""
        inputs = self.put(inputs)
        jax.block_until_ready(self.run(inputs))
        times: dict[str, list[float]] = {}
        for _ in range(steps):
            jax.block_until_ready(self.cache)
            start = time.perf_counter()
            tokens, _ = self.run(inputs)
            pending = {str(s.device): s.data for s in tokens.addressable_shards}
            while pending:
                for dev, arr in list(pending.items()):
                    if arr.is_ready():
                        times.setdefault(dev, []).append((time.perf_counter() - start) * 1e3)
                        del pending[dev]
        return {dev: statistics.median(v) for dev, v in sorted(times.items())}

    def checksums(self) -> dict[str, list[float]]:
        """Per leaf: mean |x| (equal up to reduction order) and the first 8 values (exact)."""
        def sums(p: Any) -> tuple[list[jax.Array], list[jax.Array]]:
            leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(p)]
            return [jnp.mean(jnp.abs(x)) for x in leaves], [jnp.ravel(x)[:8] for x in leaves]
        mean_abs, head = jax.device_get(jax.jit(sums)(self.params))
        return {"mean_abs": [float(m) for m in mean_abs],
                "head": [float(v) for h in head for v in h]}


def greedy(r: Runner, cfg: ModelConfig, prompt: list[int], steps: int, page_size: int,
           pages_per_seq: int) -> tuple[list[int], list[float], list[float]]:
    """Prefill `prompt` as sequence 0, then `steps` greedy decode steps (batch 1)."""
    rng = np.random.default_rng(0)
    kw = dict(page_size=page_size, pages_per_seq=pages_per_seq, rng=rng, vocab=cfg.vocab_size)
    tokens, top1, gaps = [], [], []
    inputs = step_inputs([len(prompt)], [len(prompt)], tokens=prompt, **kw)
    for i in range(steps + 1):
        tok, top2 = jax.device_get(r.run(r.put(inputs)))
        tokens.append(int(tok[0]))
        top1.append(float(top2[0, 0]))
        gaps.append(float(top2[0, 0] - top2[0, 1]))
        inputs = step_inputs([1], [len(prompt) + i + 1], tokens=[tokens[-1]], **kw)
    return tokens, top1, gaps


def bench_tp(cfg: ModelConfig, tp: int, args: argparse.Namespace) -> dict[str, Any]:
    page_size = args.page_size
    longest = max(args.context + 2, args.prefill_tokens + args.greedy_steps + 1)
    pages_per_seq = math.ceil(longest / page_size)
    num_pages = 1 + max(max(args.decode_batches), 1) * pages_per_seq
    r = Runner(cfg, tp, num_pages, page_size, args.attention_impl, args.program_copies,
               args.all_reduce, args.split_k, args.decode_gemm, not args.no_rope_write,
               not args.no_skip_padding, args.gpu_pad_mib, args.replicate_embedding)
    q = r.params["layers_0"]["attn"]["q_proj"]["kernel"]
    rng = np.random.default_rng(1)
    kw = dict(page_size=page_size, pages_per_seq=pages_per_seq, rng=rng, vocab=cfg.vocab_size)
    res: dict[str, Any] = {
        "tp": tp, "mesh": dict(r.plan.mesh.shape),
        "devices": [str(d) for d in r.plan.mesh.devices.flat],
        "q_proj_shard_shape": list(q.addressable_shards[0].data.shape),
        "kv_cache_spec": str(r.plan.kv_sharding.spec),
        "all_reduce": args.all_reduce, "fused_norm": not args.no_fused_norm,
        "split_k": getattr(r.plan.row_parallel_fn, "split_k", None),
        "decode_gemm": args.decode_gemm,
        "rope_write_kv": bool(getattr(r.plan.project_fn, "fuse_rope_write", False)),
        "skip_padding_rows": bool(getattr(r.plan.row_parallel_fn, "skip_padding", False)),
        "skinny_gemm_table": str(ops.skinny_gemm_table_path()),
        "row_parallel": ("xla collective" if r.plan.row_parallel_fn is None else
                         "psum under shard_map" if r.plan.row_parallel_fn.all_reduce is None
                         else "xlaserve kernel (decode-sized" + (
                             ", fused with the residual add + RMSNorm)" if not args.no_fused_norm
                             else ")") + " + xla collective (larger)"),
        "param_checksums": r.checksums()}
    prompt = rng.integers(0, cfg.vocab_size, args.prefill_tokens).tolist()
    res["greedy_tokens"], res["greedy_top1"], res["greedy_gap"] = greedy(
        r, cfg, prompt, args.greedy_steps, page_size, pages_per_seq)

    res["decode"] = {}
    for b in args.decode_batches:
        inputs = step_inputs([1] * b, [args.context + 1] * b, **kw)
        ms = r.time_steps(inputs, args.iters, args.repeats)
        dispatch = statistics.median(r.dispatch_s) * 1e3
        dev = r.per_device_ms(inputs, args.spread_steps)
        res["decode"][str(b)] = summarize(ms, dev, tokens=b)
        if args.slope_iters:
            slope = r.slope_ms(inputs, args.iters, args.slope_iters, args.repeats)
            res["decode"][str(b)]["step_ms_slope"] = round(statistics.median(slope), 4)
            res["decode"][str(b)]["step_ms_slope_runs"] = [round(x, 4) for x in slope]
            res["decode"][str(b)]["slope_iters"] = [args.iters, args.slope_iters]
        # the host's time inside each back-to-back step call (the launches on every device):
        # close to step_ms means the loop is host-bound
        res["decode"][str(b)]["dispatch_ms"] = round(dispatch, 4)
        if args.trace_dir:
            on_mesh = r.put(inputs)
            res["decode"][str(b)]["trace"] = trace_summary.trace_calls(
                functools.partial(r.run, on_mesh), f"{args.trace_dir}/tp{tp}_b{b}",
                args.trace_steps)
    if not args.no_prefill:
        inputs = step_inputs([args.prefill_tokens], [args.prefill_tokens], **kw)
        ms = r.time_steps(inputs, max(1, args.iters // 4), args.repeats)
        dev = r.per_device_ms(inputs, max(3, args.spread_steps // 4))
        res["prefill"] = summarize(ms, dev, tokens=args.prefill_tokens)
    res["compile_s"] = r.compile_s
    res["kernel_mentions"] = r.kernels
    shapes = {(pow2_at_least(b, MIN_TOKENS), pow2_at_least(b, MIN_SEQS))
              for b in args.decode_batches + [1]}
    shapes.add((pow2_at_least(args.prefill_tokens, MIN_TOKENS), MIN_SEQS))
    res["expected_programs"] = len(shapes)  # the compiled executables are called directly, so
    # a shape outside them would raise rather than recompile
    res["num_programs"] = len({key[:2] for key in r.compiled})
    res["num_executables"] = len(r.compiled)  # up to programs x --program-copies
    del r
    gc.collect()
    return res


def shard_config(cfg: ModelConfig, n: int) -> ModelConfig:
    """The shapes one device holds at tp = n, as a model of its own (``--shard-of``).

    Run at tp=1, it measures on ONE GPU the kernels of a tp=n device's step at their shapes: q
    heads, MLP width and vocabulary divided by n, KV heads too (one per device when n exceeds
    them, as the sharding plan stores), hidden size and head_dim kept. What it leaves out: the
    all-reduces (here XLA's add and norm fusions instead) and the vocab-sharded lm_head's
    all-gather. Session 30: 2.59-2.61 ms for the 8B's tp=2 shard against tp=2's 2.70-2.74."""
    if n < 1:
        raise ValueError(f"--shard-of {n}: must be >= 1")
    for field in ("num_heads", "intermediate_size", "vocab_size"):
        if getattr(cfg, field) % n:
            raise ValueError(f"--shard-of {n}: {field}={getattr(cfg, field)} is not divisible "
                             f"by {n}")
    kv = cfg.num_kv_heads
    if kv >= n and kv % n:
        raise ValueError(f"--shard-of {n}: num_kv_heads={kv} is not divisible by {n}")
    return cfg.replace(num_heads=cfg.num_heads // n, num_kv_heads=max(kv // n, 1),
                       intermediate_size=cfg.intermediate_size // n,
                       vocab_size=cfg.vocab_size // n)


def load_model_config(args: argparse.Namespace) -> ModelConfig:
    cfg = TINY if args.model == "tiny" else hf.load_config(args.model,
                                                           dtype=args.dtype or "bfloat16")
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    if args.num_layers:
        cfg = cfg.replace(num_layers=args.num_layers)
    if args.shard_of != 1:
        cfg = shard_config(cfg, args.shard_of)
    return cfg


def run_children(args: argparse.Namespace, argv: list[str]) -> int:
    """Runs each tp in its own process (this one never starts a backend) and merges the reports.

    A child that fails or outlives --child-timeout is recorded under "failed" and the others go
    on; the merged report is written after every child.
    """
    import subprocess
    import tempfile

    tps = sorted(set(args.tp))
    if args.tp != tps:
        raise ValueError(f"--tp {args.tp}: give increasing, distinct sizes")
    cfg = load_model_config(args)
    merged: dict[str, Any] = {}
    failed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for tp in tps:
            out = pathlib.Path(tmp) / f"tp{tp}.json"
            cmd = [sys.executable, __file__, *argv, "--tp", str(tp), "--out", str(out),
                   "--in-process"]
            try:
                rc = subprocess.run(cmd, timeout=args.child_timeout).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            if not out.exists():
                failed.append({"tp": tp, "exit": rc})
                print(f"tp={tp}: child process failed ({rc})", file=sys.stderr, flush=True)
                continue
            child = json.loads(out.read_text())
            if not merged:
                merged = {**child, "results": [], "processes": "one per tp"}
                merged["command"] = " ".join([sys.executable, __file__, *argv])
            merged["results"].extend(child["results"])
            merged["failed"] = failed
            merged["scaling"] = scaling(merged["results"])
            merged["checks"] = checks(cfg, merged["results"])
            merged["complete"] = tp == tps[-1] and not failed
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(merged, indent=1) + "\n")
    if not merged:
        return 1
    print(json.dumps({"scaling": merged["scaling"], "checks": merged["checks"],
                      "failed": failed}, indent=1))
    bad = [k for k, v in merged["checks"].items() if v is False]
    if bad:
        print(f"FAILED checks: {bad}", file=sys.stderr)
    return 1 if (failed or (bad and args.strict)) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF config directory (default: Llama-3.1-8B shapes) or 'tiny' (CPU)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, default=1024, help="KV tokens per decode sequence")
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--program-copies", type=int, default=1,
                   help="compile each step program N times and call the copies in turn (does "
                        "it spare XLA's CUDA-graph updates?)")
    p.add_argument("--no-prefill", action="store_true",
                   help="skip the prefill timing (the greedy check still prefills)")
    p.add_argument("--num-layers", type=int, default=None, help="override (quick runs)")
    p.add_argument("--shard-of", type=int, default=1, metavar="N",
                   help="the model of one tp=N device's shard (heads, KV heads, MLP and vocab "
                        "divided by N), to run at --tp 1: tp=N's per-device kernels on one GPU, "
                        "minus the all-reduces (shard_config)")
    p.add_argument("--dtype", default=None, help="default bfloat16 (float32 for tiny)")
    p.add_argument("--attention-impl", default="auto")
    p.add_argument("--all-reduce", default="auto", choices=["auto", "xla", "custom", "psum"],
                   help="row-parallel all-reduce (ParallelConfig.all_reduce)")
    p.add_argument("--no-fused-norm", action="store_true",
                   help="A/B: the all-reduce kernel without the fused residual add + RMSNorm "
                        "(the add and norm run as XLA fusions after it)")
    p.add_argument("--split-k", type=int, default=None,
                   help="o_proj / down_proj as explicit split-K partials summed in the fused "
                        "all-reduce (default: the plan's)")
    p.add_argument("--decode-gemm", default="auto", choices=ops.SKINNY_GEMM_MODES,
                   help="q/k/v, o and down products of decode-sized steps: the Pallas skinny "
                        "GEMM (auto: for the measured table's shapes) or XLA's")
    p.add_argument("--no-rope-write", action="store_true",
                   help="A/B: q/k/v's rope and K/V write as XLA fusions + write_kv_pages, not "
                        "the rope_write_kv kernel after the skinny GEMM")
    p.add_argument("--no-skip-padding", action="store_true",
                   help="A/B: the fused all-reduce exchanges the step's padding rows too")
    p.add_argument("--gpu-pad-mib", type=int, default=0,
                   help="A/B: the step also sums a replicated bf16 array of this many MiB (known "
                        "extra device time; host-bound steps do not slow by all of it)")
    p.add_argument("--replicate-embedding", action="store_true",
                   help="A/B: the input embedding table whole on every device (no all-reduce of "
                        "the looked-up rows; lm_head stays split)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--slope-iters", type=int, default=80,
                   help="also time runs of this many steps against --iters ones and report the "
                        "slope (step_ms_slope: the steady-state step, without the first "
                        "launch); 0: off")
    p.add_argument("--spread-steps", type=int, default=20)
    p.add_argument("--greedy-steps", type=int, default=8)
    p.add_argument("--compilation-cache-dir", default=None,
                   help="persistent compile cache (default: xlaserve's); 'none' disables it")
    p.add_argument("--xla-flags", default="",
                   help="appended to XLA_FLAGS before the backend starts, e.g. "
                        "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true")
    p.add_argument("--trace-dir", default=None,
                   help="also trace the decode steps (jax.profiler) and summarize the kernels")
    p.add_argument("--trace-steps", type=int, default=5)
    p.add_argument("--strict", action="store_true", help="exit 1 when a self-check fails")
    p.add_argument("--in-process", action="store_true",
                   help="run every tp in this process (default: one child process per tp; on "
                        "some hosts a second mesh in one process stalled while it was built)")
    p.add_argument("--child-timeout", type=float, default=None,
                   help="seconds per tp child process (default: no limit)")
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    if len(set(args.tp)) > 1 and not args.in_process:
        return run_children(args, list(sys.argv[1:] if argv is None else argv))
    if args.xla_flags:  # read when the backend starts, i.e. at the first device query below
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()

    if args.no_fused_norm:
        from xlaserve.sharding import all_reduce as custom_all_reduce
        custom_all_reduce.fits_add_rms_norm = lambda shape, dtype: False  # bench-only switch
    if args.compilation_cache_dir != "none":
        setup_compilation_cache(args.compilation_cache_dir)
    try:
        cfg = load_model_config(args)
    except ValueError as e:  # a --shard-of that does not divide the model: exit 2, the field named
        p.error(str(e))
    tps = sorted(set(args.tp))
    if args.tp != tps:
        raise ValueError(f"--tp {args.tp}: give increasing, distinct sizes")
    d = jax.devices()[0]
    report: dict[str, Any] = {
        "benchmark": "tp_scaling", "device": f"{d.platform}:{d.device_kind}",
        "num_devices": jax.device_count(), "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
        "client_env": {k: v for k, v in os.environ.items()
                       if k.startswith("XLA_PYTHON_CLIENT_")},
        "python": platform.python_version(), "command": " ".join([sys.executable] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "config": {k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "dtype")},
        "params": llama.count_params(cfg),
        "settings": {k: getattr(args, k) for k in (
            "decode_batches", "context", "prefill_tokens", "page_size", "attention_impl",
            "iters", "slope_iters", "repeats", "spread_steps", "greedy_steps", "program_copies",
            "gpu_pad_mib", "replicate_embedding", "shard_of")},
        "results": []}
    for tp in tps:
        print(f"tp={tp}: building and compiling ...", flush=True)
        res = bench_tp(cfg, tp, args)
        report["results"].append(res)
        dec = ", ".join(f"B={b} {v['step_ms']:.3f} ms (spread {v['per_device_spread_ms']:.3f}, "
                        f"dispatch {v['dispatch_ms']:.3f}"
                        + (f", slope {v['step_ms_slope']:.3f}" if "step_ms_slope" in v else "")
                        + ")" for b, v in res["decode"].items())
        pre = f"{res['prefill']['step_ms']:.2f} ms" if "prefill" in res else "-"
        print(f"tp={tp}: decode {dec}; prefill {pre}; "
              f"compile {res['compile_s']} kernels {res['kernel_mentions']}", flush=True)
        # Written after every tp, so a run cut off by a time limit keeps what it measured.
        report["scaling"] = scaling(report["results"])
        report["checks"] = checks(cfg, report["results"])
        report["complete"] = tp == tps[-1]
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"scaling": report["scaling"], "checks": report["checks"]}, indent=1))
    failed = [k for k, v in report["checks"].items() if v is False]
    if failed:
        print(f"FAILED checks: {failed}", file=sys.stderr)
    return 1 if (failed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
