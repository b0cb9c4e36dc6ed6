"""ModelRunner: owns params and KV pages; runs one pre-compiled step per shape bucket.

The step is ``step(params, kv_cache, inputs) -> (SamplerOutput, kv_cache)``: the model forward
(`models.llama.forward`) and on-device sampling (`sampling.sample`) in one jitted program, with the
KV cache donated so the page pools are updated in place (no per-step copy).

Shapes. Every StepInputs is padded by the batch builder to a (T, S) bucket: T from
`token_buckets` (powers of two from 16 up to max_num_batched_tokens), S from `seq_buckets` (powers
of two from 8 up to max_num_seqs), with S <= T (each sequence has at least one token). A third
dimension is the width W of the penalty token history, fixed per runner: max_model_len, so one
program per (T, S) serves batches with and without penalties (the runner pads the history to W;
a batch with no history reuses a cached all -1 device array, so the common case copies nothing and
the sampler skips the penalty tables under a lax.cond). With ``enable_penalties=False`` W is 1 and
a batch with history raises ValueError.

Compilation. `warmup()` lowers and compiles every program once (``jitted.lower(...).compile()``,
through JAX's persistent compilation cache on disk) and keeps a `CompileRecord` per bucket for
profiling (`compile_records[(T, S)]`).
Execution calls those executables directly, so nothing recompiles. A shape with no executable
goes through the plain jit path; after warm-up each compile that causes is counted in
`compiles_after_warmup`, recorded in `compile_log` and logged as an ERROR.

Programs (runtime/step_programs.py). Per (T, S) bucket one forward program that ends with a
greedy sampler; per S bucket four small sampler programs (SamplerMode: top-k/p sort, top-n
logprobs) that a batch needing temperature, penalties, logit_bias, filters or logprobs runs after
it. The host picks; no program has a lax.cond. Logprobs come back only when
`execute(..., num_logprobs=n)` asks, in the same device->host copy as the sampled ids.

Overlap. `execute_async` dispatches the step and returns at once (JAX dispatch is asynchronous);
the host builds step N+1 while the device runs step N, and `PendingOutput.result()` does the one
device->host copy.

This module does not schedule, allocate pages, or pad inputs to buckets (runtime/batch.py does).
The input contract checks and the cached stand-ins for absent inputs (no placeholders, no penalty
history, no logit_bias) are in runtime/step_arrays.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from xlaserve.runtime import hardware, packing, sampling, step_arrays, step_programs, xla_flags
from xlaserve.runtime.batch import (
    MAX_LOGIT_BIAS,
    StepInputs,
    choose_bucket,
)
from xlaserve.runtime.compile_cache import (
    CompileRecord,
    LateCompile,
    RecompileGuard,
    lower_and_compile,
    setup_compilation_cache,
)
from xlaserve.runtime.config import CacheConfig, ModelConfig, SchedulerConfig, pow2_buckets
from xlaserve.runtime.step_arrays import greedy_sampling_inputs
from xlaserve.runtime.models import llama

log = logging.getLogger(__name__)

MIN_TOKEN_BUCKET = 16
MIN_SEQ_BUCKET = 8
CPU_DEFAULT_KV_BYTES = 1 << 30  # KV budget when the device reports no memory stats (CPU)

ProgressFn = Callable[[int, int, tuple[int, int, int], CompileRecord], None]
__all__ = ["ModelRunner", "PendingOutput", "RunnerOutput", "choose_bucket",
           "greedy_sampling_inputs"]  # choose_bucket lives in batch.py, re-exported here


@dataclasses.dataclass(frozen=True)
class RunnerOutput:
    """What one step sends back to the host. Rows past the step's num_seqs are padding."""

    sampled_token_ids: np.ndarray  # i32[S_bucket]
    logprobs: np.ndarray | None = None  # f32[S]: raw logprob of the sampled token, when asked
    top_logprob_ids: np.ndarray | None = None  # i32[S, n], best first, when asked
    top_logprobs: np.ndarray | None = None  # f32[S, n]


class PendingOutput:
    """A dispatched step; `result()` blocks and does the single device->host copy."""

    def __init__(self, out: sampling.SamplerOutput, num_logprobs: int | None,
                 padded_tokens: jax.Array | None = None) -> None:
        self._out = out
        self.padded_tokens = padded_tokens  # i32[S_max] on the device: a chained step's input
        self._num_logprobs = num_logprobs
        self._result: RunnerOutput | None = None
        # Start the copies now so they overlap with host work; result() then only waits.
        for a in self._wanted():
            a.copy_to_host_async()

    def _wanted(self) -> list[jax.Array]:
        if self._num_logprobs is None:
            return [self._out.token_ids]
        # Whole [S, 20] arrays, sliced on the host: slicing on device would compile per n.
        return [self._out.token_ids, self._out.logprobs, self._out.top_logprob_ids,
                self._out.top_logprobs]

    def result(self) -> RunnerOutput:
        """Waits for the step and returns its host-side output (cached after the first call)."""
        if self._result is None:
            host = jax.device_get(self._wanted())
            if self._num_logprobs is None:
                self._result = RunnerOutput(sampled_token_ids=host[0])
            else:
                n = self._num_logprobs
                self._result = RunnerOutput(sampled_token_ids=host[0], logprobs=host[1],
                                            top_logprob_ids=host[2][:, :n],
                                            top_logprobs=host[3][:, :n])
        return self._result


def num_pages_from_memory(bytes_limit: int, bytes_in_use: int, utilization: float,
                          page_bytes: int) -> int:
    """KV pages that fit in `bytes_limit * utilization` after what is in use (the weights).

    Raises:
      ValueError: fewer than 2 pages fit (page 0 is the reserved padding page).
    """
    budget = int(bytes_limit * utilization) - bytes_in_use
    num_pages = budget // page_bytes
    if num_pages < 2:
        raise ValueError(f"gpu_memory_utilization={utilization}: leaves {budget} bytes of "
                         f"{bytes_limit} ({bytes_in_use} in use) for KV pages of {page_bytes} "
                         f"bytes each; need >= 2 pages")
    return int(num_pages)


def kv_memory_source(platform: str, stats: dict[str, Any] | None,
                     driver: Callable[[], tuple[int, int] | None], mem_fraction: float = 0.75,
                     ) -> tuple[int, int, str] | None:
    """(bytes_limit, bytes_in_use, where from) to size the KV cache by, or None.

    XLA's allocator stats first (`memory_stats()`: the BFC allocator's limit and use). XLA's
    VMM and platform allocators report none (`memory_stats()` is None): a GPU then asks the
    driver (`driver`, called only then), and the limit is `mem_fraction` of its total memory,
    in use = total - free. The VMM allocator's physical budget is that fraction (jax's
    XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default: measured 112.58 GB of an H200's 150.7 GB,
    the BFC limit's size); the platform allocator has none, so the fraction only leaves some
    memory unused there. A CPU has neither: None.
    """
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0)), "allocator"
    if platform == "cpu":
        return None
    info = driver()
    if info is None:
        return None
    free, total = info
    return int(total * mem_fraction), total - free, f"driver, {mem_fraction:g} of the total"


def num_pages_without_memory_stats(platform: str, full_need: int, page_bytes: int) -> int:
    """KV pages when the device reports no memory limit (`memory_stats()` without bytes_limit):
    every sequence at max_model_len (`full_need` pages), capped at CPU_DEFAULT_KV_BYTES.

    On a CPU that is the plan. On an accelerator it is a fallback that can leave most of the
    memory unused (before `kv_memory_source` asked the driver, XLA's VMM allocator, which
    reports no limit, gave the 8B model 512 pages against 40657: bench/results/session19_h200/),
    so it is logged as a warning naming the remedy.
    """
    num_pages = max(2, min(full_need, CPU_DEFAULT_KV_BYTES // page_bytes))
    if platform == "cpu":
        log.info("num_pages=%d: cpu reports no memory stats; default is every sequence at "
                 "max_model_len, capped at %d MiB of KV", num_pages, CPU_DEFAULT_KV_BYTES >> 20)
    else:
        log.warning("num_pages=%d (%d MiB of KV): the %s device reports no memory limit "
                    "(memory_stats() has no bytes_limit and the driver was not asked or did not "
                    "answer), so gpu_memory_utilization cannot apply; set num_pages "
                    "(--num-pages) to size the KV cache", num_pages,
                    num_pages * page_bytes >> 20, platform)
    return int(num_pages)


def _check_buckets(field: str, given: Sequence[int] | None, maximum: int,
                   default: tuple[int, ...]) -> tuple[int, ...]:
    """`given` validated (ascending, distinct, positive, last one covers `maximum`), or default."""
    if given is None:
        return default
    b = tuple(int(x) for x in given)
    if not b or list(b) != sorted(set(b)) or b[0] < 1 or b[-1] < maximum:
        raise ValueError(f"{field}={b}: must be ascending, distinct, positive, the last >= "
                         f"{maximum}")
    return b


def _describe(inputs: StepInputs) -> str:
    """Shapes of a StepInputs, for compile logs."""
    parts = [f"{k}{list(np.shape(v))}" for k, v in (
        ("token_ids", inputs.token_ids), ("cu_q_lens", inputs.cu_q_lens),
        ("page_table", inputs.page_table))]
    if inputs.sampling is not None:
        parts.append(f"history{list(np.shape(inputs.sampling.output_token_ids))}")
    return " ".join(parts)


class ModelRunner:
    """Owns params, KV pages and one compiled step per (T bucket, S bucket, history width).

    Args:
      model_cfg: the decoder's shapes.
      params: model parameters (as from llama.init_params or a checkpoint loader).
      cache_cfg: page size and page count (or the memory fraction to derive it from).
      sched_cfg: the step limits that define the buckets and max_model_len.
      attention_impl: ops.ragged_paged_attention implementation name.
      compilation_cache_dir: persistent compile cache (None: compile_cache.default_cache_dir()).
      mesh, param_shardings, kv_sharding: when a mesh is given the step is jitted with explicit
        in/out shardings: params as `param_shardings` (default: replicated), the KV
        arrays as `kv_sharding` (one Sharding for every array, or a per-layer tree; default
        replicated), inputs and sampled outputs replicated.
      kv_cache_heads: heads stored in each KV array: a sharding plan's ``kv_cache_heads`` (tp
        when tp exceeds the KV heads). Default: the attention_fn's ``kv_cache_heads`` if it has
        one (sharding.specs.ShardedAttention), else model_cfg.num_kv_heads.
      attention_fn: replaces the model's attention step (e.g. the sharding plan's shard_map).
      row_parallel_fn: computes o_proj and down_proj with the residual add and the RMSNorm
        after each (`llama.RowParallelFn`: the sharding plan's explicit all-reduce, fused).
      project_fn: computes q_proj, k_proj and v_proj in one launch (`llama.ProjectFn`: the
        decode GEMM, sharding.decode_gemm.DecodeProjection).
      enable_penalties: also compile the penalty-history variant of every bucket.
      token_buckets, seq_buckets: explicit bucket lists (default: powers of two from 16 / 8);
        ascending, the last at least max_num_batched_tokens / max_num_seqs.
    """

    def __init__(self, model_cfg: ModelConfig, params: Any, cache_cfg: CacheConfig,
                 sched_cfg: SchedulerConfig, *, attention_impl: str = "auto",
                 compilation_cache_dir: str | None = None, mesh: jax.sharding.Mesh | None = None,
                 param_shardings: Any = None, kv_sharding: Any = None,
                 kv_cache_heads: int | None = None,
                 attention_fn: llama.AttentionFn | None = None,
                 row_parallel_fn: llama.RowParallelFn | None = None,
                 project_fn: llama.ProjectFn | None = None, enable_penalties: bool = True,
                 token_buckets: Sequence[int] | None = None,
                 seq_buckets: Sequence[int] | None = None) -> None:
        xla_flags.log_applied()
        self.model_cfg = model_cfg
        self.cache_cfg = cache_cfg
        self.sched_cfg = sched_cfg
        self.attention_impl = attention_impl
        self.attention_fn = attention_fn
        self.row_parallel_fn = row_parallel_fn
        self.project_fn = project_fn
        self.mesh = mesh
        wanted = getattr(attention_fn, "kv_cache_heads", None)
        if kv_cache_heads is not None and wanted is not None and kv_cache_heads != wanted:
            raise ValueError(f"kv_cache_heads={kv_cache_heads}: the attention_fn reads caches of "
                             f"{wanted} heads (use the sharding plan's kv_cache_heads)")
        self.kv_cache_heads = next(h for h in (kv_cache_heads, wanted, model_cfg.num_kv_heads)
                                   if h is not None)
        self.compilation_cache_dir = setup_compilation_cache(compilation_cache_dir)
        self.page_size = cache_cfg.page_size
        self.max_pages_per_seq = math.ceil(sched_cfg.max_model_len / self.page_size)
        self.token_buckets = _check_buckets(
            "token_buckets", token_buckets, sched_cfg.max_num_batched_tokens,
            pow2_buckets(MIN_TOKEN_BUCKET, sched_cfg.max_num_batched_tokens))
        self.seq_buckets = _check_buckets("seq_buckets", seq_buckets, sched_cfg.max_num_seqs,
                                          pow2_buckets(MIN_SEQ_BUCKET, sched_cfg.max_num_seqs))
        # Penalty history width W of every compiled program: max_model_len (one program per
        # bucket serves batches with and without penalties; batches without any history use a
        # cached all -1 device array, so nothing is copied), or 1 with enable_penalties=False.
        self.history_width = sched_cfg.max_model_len if enable_penalties else 1
        self.history_widths = (self.history_width,)

        self._replicated = None
        if mesh is None and (param_shardings is not None or kv_sharding is not None):
            raise ValueError("mesh=None: param_shardings and kv_sharding need the mesh too")
        if mesh is not None:
            self._replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            if param_shardings is None:
                param_shardings = jax.tree.map(lambda _: self._replicated, params)
            params = jax.device_put(params, param_shardings)
        self.params = params
        self._stand_ins = step_arrays.StandIns(self._replicated, self.history_width,
                                               sched_cfg.max_model_len, self.seq_buckets[-1])

        single_kv = kv_sharding if isinstance(kv_sharding, jax.sharding.Sharding) else None
        if mesh is not None and kv_sharding is None:
            single_kv = self._replicated
        self.num_pages = self._choose_num_pages(single_kv)
        self.kv_cache = llama.init_kv_cache(model_cfg, self.num_pages, self.page_size,
                                            sharding=single_kv, num_heads=self.kv_cache_heads)
        if kv_sharding is not None and single_kv is None:
            self.kv_cache = jax.device_put(self.kv_cache, kv_sharding)

        jit_kwargs: dict[str, Any] = {"donate_argnums": (1,)}
        packed_kwargs: dict[str, Any] = {"donate_argnums": (1,)}
        if mesh is not None:
            kv_tree = jax.tree.map(lambda a: a.sharding, self.kv_cache)
            jit_kwargs["in_shardings"] = (param_shardings, kv_tree, self._replicated)
            jit_kwargs["out_shardings"] = (self._replicated, kv_tree)
            packed_kwargs["in_shardings"] = (param_shardings, kv_tree, self._replicated,
                                             self._replicated, self._replicated)
            packed_kwargs["out_shardings"] = (self._replicated, kv_tree)
        # The step on a StepInputs (eval_shape, tests). Execution runs the packed form: the
        # same step behind packing.unpack, so each step makes one host->device copy.
        self._model_spec = step_programs.ModelSpec(model_cfg, attention_impl, attention_fn,
                                                   self.seq_buckets[-1], row_parallel_fn,
                                                   project_fn)
        self.jitted_step = jax.jit(functools.partial(step_programs.full_step, self._model_spec),
                                   **jit_kwargs)
        self._packed_kwargs = packed_kwargs
        sampler_kwargs: dict[str, Any] = {}
        if mesh is not None:
            sampler_kwargs = {"in_shardings": self._replicated,
                              "out_shardings": self._replicated}
        self._samplers = {mode: jax.jit(functools.partial(step_programs.sampler_step, mode=mode,
                                                          max_seqs=self.seq_buckets[-1]),
                                        **sampler_kwargs) for mode in sampling.SAMPLER_MODES}
        self._sampler_executables: dict[tuple[int, int, sampling.SamplerMode], Any] = {}
        self._packed_jits: dict[packing.PackSpec, Any] = {}
        self._specs: dict[tuple[int, int, int], packing.PackSpec] = {}
        self._executables: dict[tuple[int, int, int], Any] = {}
        self.compile_records: dict[tuple[int, int], CompileRecord] = {}
        self._guard = RecompileGuard("ModelRunner")

    # ------------------------------------------------------------------ set-up

    def _choose_num_pages(self, kv_sharding: jax.sharding.Sharding | None) -> int:
        """Pages from cache_cfg, else from free device memory after the weights."""
        if self.cache_cfg.num_pages is not None:
            return self.cache_cfg.num_pages
        cfg = self.model_cfg
        page_bytes = (cfg.kv_bytes_per_token // cfg.num_kv_heads * self.kv_cache_heads
                      * self.page_size)  # all stored heads
        leaf = jax.tree.leaves(self.params)[0]
        if self.mesh is not None:
            device = self.mesh.devices.flat[0]
        elif isinstance(leaf, jax.Array):
            device = next(iter(leaf.devices()))
        else:
            device = jax.devices()[0]
        if kv_sharding is not None:  # each device holds only its shard of the pools
            probe = (self.kv_cache_heads, 64 * len(kv_sharding.device_set),
                     self.page_size, cfg.head_dim)  # [C, P, L, H], P divisible
            page_bytes = page_bytes * math.prod(kv_sharding.shard_shape(probe)) // math.prod(probe)
        # jax's documented budget of XLA's GPU allocators (read here, where XLA reads it too)
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
        source = kv_memory_source(
            device.platform, device.memory_stats(),
            lambda: hardware.cuda_memory_info(int(device.local_hardware_id)), fraction)
        if source is not None:
            limit, in_use, where = source
            util = self.cache_cfg.gpu_memory_utilization
            num_pages = num_pages_from_memory(limit, in_use, util, page_bytes)
            log.info("num_pages=%d from %s memory (%s): limit %d B x %.2f - in use %d B, "
                     "%d B/page", num_pages, device, where, limit, util, in_use, page_bytes)
            return num_pages
        full_need = self.sched_cfg.max_num_seqs * self.max_pages_per_seq + 1
        return num_pages_without_memory_stats(device.platform, full_need, page_bytes)

    def _packed_jit(self, spec: packing.PackSpec) -> Any:
        """The jitted step taking (params, kv, packed i32 vector, separate leaves) for `spec`."""
        jitted = self._packed_jits.get(spec)
        if jitted is None:
            def step(params: Any, kv_cache: llama.KVCache, packed: jax.Array,
                     separate: tuple[jax.Array, ...], prev_tokens: jax.Array) -> Any:
                return step_programs.forward_step(self._model_spec, params, kv_cache,
                                                  packing.unpack(packed, separate, spec),
                                                  prev_tokens)
            jitted = jax.jit(step, **self._packed_kwargs)
            self._packed_jits[spec] = jitted
        return jitted

    def _spec(self, key: tuple[int, int, int], inputs: StepInputs) -> packing.PackSpec:
        spec = self._specs.get(key)
        if spec is None:
            spec = self._specs[key] = packing.spec_of(inputs)
        return spec

    # ------------------------------------------------------------------ buckets

    def bucket_keys(self) -> list[tuple[int, int]]:
        """Every (T, S) bucket a step can use.

        A step with n sequences has >= n tokens, so T bucket t pairs only with the S buckets of
        1..min(t, max_num_seqs) sequences (S <= T with the default buckets).
        """
        keys = []
        for t in self.token_buckets:
            most = min(t, self.sched_cfg.max_num_seqs)
            keys += [(t, s) for s in self.seq_buckets
                     if s <= most or s == choose_bucket(most, self.seq_buckets)]
        return keys

    def dummy_inputs(self, num_tokens: int, num_seqs: int,
                     history_width: int | None = None) -> StepInputs:
        """An all-padding StepInputs of bucket shape (T, S), history width W (default: ours)."""
        t, s = num_tokens, num_seqs
        history_width = self.history_width if history_width is None else history_width
        smp = greedy_sampling_inputs(s)
        if history_width != 1:
            hist = np.full((s, history_width), -1, np.int32)
            smp = dataclasses.replace(smp, prompt_token_ids=hist, output_token_ids=hist.copy())
        return StepInputs(
            token_ids=np.zeros(t, np.int32), positions=np.zeros(t, np.int32),
            slot_mapping=np.zeros(t, np.int32), cu_q_lens=np.zeros(s + 1, np.int32),
            kv_lens=np.zeros(s, np.int32),
            page_table=np.zeros((s, self.max_pages_per_seq), np.int32),
            num_seqs=np.zeros(1, np.int32), logits_indices=np.zeros(s, np.int32), sampling=smp,
            prev_sampled_index=np.full(t, -1, np.int32))

    def abstract_inputs(self, num_tokens: int, num_seqs: int,
                        history_width: int | None = None) -> StepInputs:
        """`dummy_inputs` as jax.ShapeDtypeStructs (replicated on the mesh when there is one)."""
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._replicated),
            self.dummy_inputs(num_tokens, num_seqs, history_width))

    # ------------------------------------------------------------------ compile

    def compile_bucket(self, num_tokens: int, num_seqs: int,
                       history_width: int | None = None) -> CompileRecord:
        """Lowers and compiles the step for one bucket and keeps its executable and record."""
        history_width = self.history_width if history_width is None else history_width
        inputs = self.abstract_inputs(num_tokens, num_seqs, history_width)
        spec = self._spec((num_tokens, num_seqs, history_width), inputs)
        separate = tuple(leaf for leaf, slot in zip(jax.tree.leaves(inputs), spec.slots,
                                                    strict=True) if slot is None)
        packed = jax.ShapeDtypeStruct((spec.size,), np.int32, sharding=self._replicated)
        prev = jax.ShapeDtypeStruct((self.seq_buckets[-1],), np.int32, sharding=self._replicated)
        record = lower_and_compile(self._packed_jit(spec), self.params, self.kv_cache, packed,
                                   separate, prev)
        self._executables[(num_tokens, num_seqs, history_width)] = record.compiled
        if history_width == self.history_width:
            self.compile_records[(num_tokens, num_seqs)] = record
        log.info("compiled T=%d S=%d W=%d: lower %.2fs, compile %.2fs, persistent cache %s",
                 num_tokens, num_seqs, history_width, record.lower_s, record.compile_s,
                 {True: "hit", False: "miss", None: "unused"}[record.cache_hit])
        return record

    def compile_sampler(self, num_seqs: int, history_width: int,
                        mode: sampling.SamplerMode) -> CompileRecord:
        """Compiles the sampler program of one S bucket, history width and mode."""
        smp = self.dummy_inputs(self.token_buckets[0], num_seqs, history_width).sampling
        assert smp is not None
        struct = lambda a: jax.ShapeDtypeStruct(  # noqa: E731
            np.shape(a), np.asarray(a).dtype, sharding=self._replicated)
        small = jax.tree.map(struct, dataclasses.replace(smp, prompt_token_ids=None,
                                                         output_token_ids=None))
        logits = jax.ShapeDtypeStruct((num_seqs, self.model_cfg.vocab_size), np.float32,
                                      sharding=self._replicated)
        bias_ids, bias = (np.zeros((num_seqs, MAX_LOGIT_BIAS), t) for t in (np.int32, np.float32))
        record = lower_and_compile(self._samplers[mode], logits, small,
                                   struct(smp.prompt_token_ids), struct(smp.output_token_ids),
                                   struct(bias_ids), struct(bias))
        self._sampler_executables[(num_seqs, history_width, mode)] = record.compiled
        return record

    def warmup(self, buckets: Iterable[tuple[int, int]] | None = None,
               progress: ProgressFn | None = None) -> None:
        """Compiles the step for `buckets` (default: all of `bucket_keys()`), every history width.

        After it returns, any further compile is counted in `compiles_after_warmup` and logged
        as an error.

        Args:
          buckets: (T, S) pairs to compile.
          progress: called after each compile with (done, total, (T, S, W), record).
        Raises:
          ValueError: a bucket that is not one of this runner's (T, S) buckets.
        """
        keys = self.bucket_keys() if buckets is None else list(buckets)
        valid = set(self.bucket_keys())
        for key in keys:
            if tuple(key) not in valid:
                raise ValueError(f"buckets: {key!r} is not a (T, S) bucket of this runner; "
                                 f"see bucket_keys(): {sorted(valid)}")
        todo = [(t, s, w) for t, s in keys for w in self.history_widths]
        start = time.perf_counter()
        for i, (t, s, w) in enumerate(todo):
            record = self.compile_bucket(t, s, w)
            if progress is not None:
                progress(i + 1, len(todo), (t, s, w), record)
        t0 = time.perf_counter()
        for s, w in sorted({(s, w) for _, s, w in todo}):
            for mode in sampling.SAMPLER_MODES:
                self.compile_sampler(s, w, mode)
        log.info("warm-up: %d sampler programs in %.1fs", len(self._sampler_executables),
                 time.perf_counter() - t0)
        hits = sum(1 for k in todo if self._record(k).cache_hit)
        log.info("warm-up: %d programs in %.1fs (%d from the persistent cache)", len(todo),
                 time.perf_counter() - start, hits)
        self._guard.arm()

    def _record(self, key: tuple[int, int, int]) -> CompileRecord:
        t, s, w = key
        del w  # one history width per runner
        return self.compile_records[(t, s)]

    @property
    def compiles_after_warmup(self) -> int:
        """XLA compiles caused by `execute` after warm-up (each one is an error)."""
        return self._guard.compiles_after_warmup

    @property
    def compile_log(self) -> list[LateCompile]:
        """One record (shapes, count, time) per step that compiled after warm-up."""
        return self._guard.compile_log

    # ------------------------------------------------------------------ execute

    def _prepare(self, inputs: StepInputs) -> StepInputs:
        """Checks widths and dtypes, fills in greedy sampling, pads the penalty history."""
        step_arrays.check_step_inputs(inputs, self.max_pages_per_seq)
        if inputs.prev_sampled_index is None:
            inputs = dataclasses.replace(
                inputs, prev_sampled_index=self._stand_ins.no_chain(inputs.num_tokens_bucket))
        smp = inputs.sampling
        if smp is None:
            smp = greedy_sampling_inputs(inputs.num_seqs_bucket)
        return dataclasses.replace(inputs, sampling=self._stand_ins.fit_history(
            smp, inputs.num_seqs_bucket))

    def execute_async(self, inputs: StepInputs, *, num_logprobs: int | None = None,
                      prev: PendingOutput | None = None) -> PendingOutput:
        """Dispatches one step and returns at once; the KV cache is updated in place.

        Args:
          inputs: a StepInputs padded to a (T, S) bucket.
          num_logprobs: None: only sampled ids come back; n in [0, 20]: also the sampled
            token's logprob and the top-n.
          prev: the step whose sampled ids `inputs.prev_sampled_index` points at (it may still
            be running: the device takes the tokens from its output, the host does not wait).
        Returns:
          A PendingOutput; `.result()` waits and copies to the host.
        """
        if num_logprobs is not None and not 0 <= num_logprobs <= sampling.MAX_TOP_LOGPROBS:
            raise ValueError(f"num_logprobs={num_logprobs}: must be in "
                             f"[0, {sampling.MAX_TOP_LOGPROBS}]")
        inputs = self._prepare(inputs)
        smp, prev_index = inputs.sampling, inputs.prev_sampled_index
        if smp is None or prev_index is None:
            raise RuntimeError("ModelRunner._prepare left sampling or prev_sampled_index unset")
        # logit_bias goes to the sampler program only; the forward program never carries it.
        bias_args = step_arrays.bias_args(smp)
        has_bias = bias_args is not None
        if smp.logit_bias_ids is not None:
            smp = dataclasses.replace(smp, logit_bias_ids=None, logit_bias=None)
        want = np.array([1 if num_logprobs else 0], np.int32)  # top-n only when asked
        smp = dataclasses.replace(smp, want_top_logprobs=want)
        inputs = dataclasses.replace(inputs, sampling=smp)
        key = (inputs.num_tokens_bucket, inputs.num_seqs_bucket,
               int(smp.output_token_ids.shape[-1]))
        if prev is None and bool((prev_index >= 0).any()):
            raise ValueError("inputs.prev_sampled_index points at a previous step: pass prev")
        prev_tokens = (prev.padded_tokens if prev is not None
                       else self._stand_ins.zero_prev_tokens())
        mode = step_programs.sampler_mode(smp, num_logprobs=num_logprobs,
                                          has_history=self._stand_ins.has_history(smp),
                                          vocab_size=self.model_cfg.vocab_size,
                                          has_bias=has_bias)
        spec = self._spec(key, inputs)
        packed, separate = packing.pack(inputs, spec)
        executable = self._executables.get(key)
        with self._guard.watch(lambda: _describe(inputs)):
            if executable is not None:
                (out, padded, logits, small), self.kv_cache = executable(
                    self.params, self.kv_cache, packed, separate, prev_tokens)
            else:  # not a warmed-up bucket: the jit path compiles (an error after warm-up)
                (out, padded, logits, small), self.kv_cache = self._packed_jit(spec)(
                    self.params, self.kv_cache, packed, separate, prev_tokens)
            if mode is not None:
                sampler = self._sampler_executables.get((key[1], key[2], mode),
                                                        self._samplers[mode])
                if bias_args is None:
                    bias_args = self._stand_ins.no_bias(key[1])
                out, padded = sampler(logits, small, smp.prompt_token_ids,
                                      smp.output_token_ids, *bias_args)
        return PendingOutput(out, num_logprobs, padded)

    def execute(self, inputs: StepInputs, *, num_logprobs: int | None = None) -> RunnerOutput:
        """Runs one step and waits for its output (see `execute_async`)."""
        return self.execute_async(inputs, num_logprobs=num_logprobs).result()
