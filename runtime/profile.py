"""What XLA made of each compiled step, and what it should cost on this device.

Reads the per-bucket compile records that `ModelRunner.warmup` keeps (the engine's own warm-up
path, not a copy of it) and turns each into a `BucketProfile`: lowering and compile time,
persistent-cache hit, HLO instruction/fusion/custom-call counts, XLA's cost analysis (FLOPs and
bytes accessed), memory analysis, and the roofline time ``max(flops / peak_flops, bytes /
peak_bandwidth)`` against `hardware.DevicePeaks`. `CompileMonitor` watches jax's own compile
events, so compiles after warm-up are caught whichever code path triggered them.

Limits, said plainly: XLA's cost analysis does not see inside opaque custom calls (Pallas/Triton
kernels, and on the H100 run of bench/results/profile_h100.json the cuBLAS GEMMs too: 22 GFLOP
reported for a 2048-token step that does 31 TFLOP), and it counts the whole donated KV pool as
traffic of the in-place update. So the XLA roofline is reported as XLA sees it, and beside it the
analytic `model_cost` roofline, counted from the model's shapes, which is the one to compare with;
with a sharded mesh the numbers are those of one device's program. This module renders nothing
(see xlaserve/profiling/render.py) and never
changes what the runner compiles.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from xlaserve.runtime.hardware import DevicePeaks

# One HLO instruction line: "%name = shape opcode(operands), attrs" (optionally "ROOT ").
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s+=\s+(.*)$")
# The opcode is the first lower-case identifier followed by "(" after the shape; shapes and
# layouts only hold upper-case tags such as T(8,128) or S(1).
_OPCODE = re.compile(r"(?<![\w.\-])([a-z][\w\-]*)\(")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
# Kernel name inside backend_config: `name = "k"`, `name="k"` or JSON `"name": "k"`.
_KERNEL_NAME = re.compile(r'(?<!\w)"?name"?\s*[=:]\s*"([^"]+)"')
# Custom-call targets that run a Pallas kernel, and the implementation family they belong to.
_PALLAS_TARGETS = {"__gpu$xla.gpu.triton": "pallas-triton", "triton_kernel_call": "pallas-triton",
                   "mosaic_gpu": "pallas-mosaic-gpu", "mosaic_gpu_v2": "pallas-mosaic-gpu",
                   "tpu_custom_call": "pallas-mosaic-tpu"}


@dataclasses.dataclass(frozen=True)
class HloStats:
    """Counts over the optimized HLO module of one compiled step."""

    num_instructions: int  # instructions in all computations (fused bodies included)
    num_fusions: int  # `fusion` instructions: kernels XLA generated itself
    custom_calls: dict[str, int]  # custom_call_target -> count (cuBLAS, Triton/Mosaic, ...)
    pallas_kernels: tuple[str, ...]  # names of the Pallas kernels in the program, sorted


def hlo_stats(hlo_text: str) -> HloStats:
    """Parses the text of an optimized HLO module (``compiled.as_text()``)."""
    num_instructions = num_fusions = 0
    targets: Counter[str] = Counter()
    kernels: set[str] = set()
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        num_instructions += 1
        op = _OPCODE.search(m.group(1))
        opcode = op.group(1) if op else ""
        if opcode == "fusion":
            num_fusions += 1
        elif opcode == "custom-call":
            t = _TARGET.search(line)
            target = t.group(1) if t else "?"
            targets[target] += 1
            if target in _PALLAS_TARGETS:
                config = line.partition("backend_config=")[2]
                k = _KERNEL_NAME.search(config)
                kernels.add(k.group(1) if k else target)
    return HloStats(num_instructions=num_instructions, num_fusions=num_fusions,
                    custom_calls=dict(sorted(targets.items())),
                    pallas_kernels=tuple(sorted(kernels)))


def attention_impl_from_hlo(stats: HloStats) -> str:
    """The attention implementation family the HLO shows: a Pallas kernel family or "reference".

    Used when the dispatcher does not say; "reference" means no Pallas custom call is present
    (on CPU the interpreted Pallas kernel also lowers to plain HLO and reads as "reference").
    """
    families = sorted({_PALLAS_TARGETS[t] for t in stats.custom_calls if t in _PALLAS_TARGETS})
    return "+".join(families) if families else "reference"


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """XLA's memory analysis of one compiled step, in bytes (device memory)."""

    argument_bytes: int  # inputs: params, KV pages, step inputs
    output_bytes: int  # outputs (aliased donated buffers count here too)
    alias_bytes: int  # outputs that reuse donated inputs (the KV pages)
    temp_bytes: int  # scratch XLA allocates for the step
    generated_code_bytes: int  # executable size

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs + temporaries, not counting aliased outputs twice."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def memory_stats(compiled: Any) -> MemoryStats:
    """Reads ``compiled.memory_analysis()``. Raises ValueError when the backend gives none."""
    ma = compiled.memory_analysis()
    if ma is None:
        raise ValueError("memory_analysis()=None: this backend reports no memory analysis")
    return MemoryStats(argument_bytes=int(ma.argument_size_in_bytes),
                       output_bytes=int(ma.output_size_in_bytes),
                       alias_bytes=int(ma.alias_size_in_bytes),
                       temp_bytes=int(ma.temp_size_in_bytes),
                       generated_code_bytes=int(ma.generated_code_size_in_bytes))


def cost_stats(compiled: Any) -> tuple[float, float]:
    """(FLOPs, bytes accessed) from ``compiled.cost_analysis()`` (a dict, or a list of them)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per program
        ca = ca[0] if ca else {}
    if not isinstance(ca, Mapping) or "flops" not in ca:
        raise ValueError(f"cost_analysis()={ca!r}: no 'flops' entry")
    return float(ca["flops"]), float(ca.get("bytes accessed", 0.0))


def roofline_seconds(flops: float, bytes_accessed: float, peaks: DevicePeaks,
                     dtype: str) -> tuple[float, str]:
    """(max(flops / peak FLOP/s, bytes / peak bandwidth), "compute" or "memory")."""
    compute_s = flops / peaks.flops_per_s(dtype)
    memory_s = bytes_accessed / peaks.memory_bytes_per_s
    return (compute_s, "compute") if compute_s >= memory_s else (memory_s, "memory")


@dataclasses.dataclass
class BucketProfile:
    """Everything known about the compiled step of one (T, S) bucket."""

    num_tokens: int  # T bucket
    num_seqs: int  # S bucket
    lower_s: float  # trace + lower to StableHLO
    compile_s: float  # XLA compile (or persistent-cache load)
    cache_hit: bool | None  # served by the persistent compilation cache; None: cache off
    attention_impl: str  # what the dispatcher chose (or what the HLO shows)
    hlo: HloStats
    flops: float  # XLA cost analysis (excludes custom calls)
    bytes_accessed: float
    memory: MemoryStats
    roofline_s: float  # max(flops / peak, bytes / bandwidth) on the profiled device
    roofline_bound: str  # "compute" or "memory"
    history_width: int = 1  # W of the penalty token history (1: no penalties in the batch)
    measured_s: float | None = None  # median step time with --run
    measured_over_roofline: float | None = None  # measured_s / roofline_s
    # Only when attention is an opaque custom call (a Pallas kernel on GPU): an analytic estimate
    # of what the kernel does at the --run context length, and the roofline with it added.
    attention_flops_est: float | None = None
    attention_bytes_est: float | None = None
    roofline_with_attention_s: float | None = None
    # The analytic roofline of the step (see `model_cost`): what the model must do at the --run
    # layout, independent of what XLA's cost analysis can see. The ratio to compare with.
    model_flops: float | None = None
    model_bytes: float | None = None
    model_roofline_s: float | None = None
    model_roofline_bound: str | None = None
    measured_over_model_roofline: float | None = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["memory"]["peak_bytes"] = self.memory.peak_bytes
        return d


def analyze_compiled(num_tokens: int, num_seqs: int, *, compiled: Any,
                     lower_s: float, compile_s: float, cache_hit: bool | None,
                     peaks: DevicePeaks, dtype: str,
                     attention_impl: str | None = None, history_width: int = 1) -> BucketProfile:
    """Builds the BucketProfile of one compiled step (a jax.stages.Compiled).

    `attention_impl` is what the dispatcher chose; None reads it off the HLO's custom calls.
    """
    hlo = hlo_stats(compiled.as_text())
    flops, bytes_accessed = cost_stats(compiled)
    roof, bound = roofline_seconds(flops, bytes_accessed, peaks, dtype)
    return BucketProfile(
        num_tokens=num_tokens, num_seqs=num_seqs, lower_s=lower_s, compile_s=compile_s,
        cache_hit=cache_hit, attention_impl=attention_impl or attention_impl_from_hlo(hlo),
        hlo=hlo, flops=flops, bytes_accessed=bytes_accessed, memory=memory_stats(compiled),
        roofline_s=roof, roofline_bound=bound, history_width=history_width)


def attention_cost(*, num_tokens: int, num_seqs: int, kv_len: int, max_model_len: int,
                   num_layers: int, num_heads: int, head_dim: int,
                   kv_bytes_per_token: int) -> tuple[float, float]:
    """(FLOPs, bytes) of paged attention for a full (T, S) bucket, each sequence at `kv_len`.

    The same layout as the --run step: T tokens split evenly over S sequences, each attending to
    max(q_len, kv_len) keys (capped at max_model_len). FLOPs: QK^T and PV, 4 * q * k * N * H per
    layer (causal masking inside a prefill chunk not subtracted). Bytes: every sequence's K and V
    pages read once. Used for the part of the step XLA's cost analysis cannot see.
    """
    q_len = max(1, min(-(-num_tokens // num_seqs), max_model_len))
    keys = min(max(q_len, kv_len), max_model_len)
    flops = 4.0 * num_tokens * keys * num_heads * head_dim * num_layers
    return flops, float(num_seqs * keys * kv_bytes_per_token)


def model_cost(*, num_tokens: int, num_seqs: int, kv_len: int, max_model_len: int,
               num_layers: int, num_heads: int, head_dim: int, hidden_size: int, vocab_size: int,
               tie_word_embeddings: bool, num_params: int, param_bytes: int,
               kv_bytes_per_token: int) -> tuple[float, float]:
    """(FLOPs, bytes) a (T, S) step must do at the --run layout, counted from the model's shapes.

    XLA's cost analysis is no roofline on GPU: it counts no FLOPs inside custom calls (cuBLAS
    GEMMs, Pallas kernels) and counts the whole donated KV pool as traffic of the in-place update.
    This counts: every weight read once (the embedding table only for its T gathered rows unless it
    is tied to the LM head), 2 FLOPs per weight per token (the LM head only for the S sampled rows),
    attention (see `attention_cost`), and T tokens of K/V written.
    """
    itemsize = param_bytes / max(num_params, 1)
    embed = vocab_size * hidden_size
    matmul_params = num_params - (0 if tie_word_embeddings else embed)
    lm_head = embed
    weight_bytes = (matmul_params + (0 if tie_word_embeddings else num_tokens * hidden_size)
                    ) * itemsize
    flops = 2.0 * num_tokens * (matmul_params - lm_head) + 2.0 * num_seqs * lm_head
    attn_flops, attn_bytes = attention_cost(
        num_tokens=num_tokens, num_seqs=num_seqs, kv_len=kv_len, max_model_len=max_model_len,
        num_layers=num_layers, num_heads=num_heads, head_dim=head_dim,
        kv_bytes_per_token=kv_bytes_per_token)
    return flops + attn_flops, weight_bytes + attn_bytes + num_tokens * kv_bytes_per_token


def add_model_roofline(bp: BucketProfile, flops: float, bytes_accessed: float,
                       peaks: DevicePeaks, dtype: str) -> None:
    """Sets the analytic roofline fields of `bp` (and the measured ratio when measured)."""
    bp.model_flops, bp.model_bytes = flops, bytes_accessed
    bp.model_roofline_s, bp.model_roofline_bound = roofline_seconds(flops, bytes_accessed, peaks,
                                                                    dtype)
    if bp.measured_s is not None and bp.model_roofline_s:
        bp.measured_over_model_roofline = bp.measured_s / bp.model_roofline_s


def add_attention_estimate(bp: BucketProfile, flops: float, bytes_accessed: float,
                           peaks: DevicePeaks, dtype: str) -> None:
    """Sets the attention estimate fields of `bp` and its roofline with them added."""
    bp.attention_flops_est, bp.attention_bytes_est = flops, bytes_accessed
    bp.roofline_with_attention_s, _ = roofline_seconds(bp.flops + flops,
                                                       bp.bytes_accessed + bytes_accessed,
                                                       peaks, dtype)


@dataclasses.dataclass(frozen=True)
class CompileEvent:
    """One XLA compile seen by `CompileMonitor`."""

    fun_name: str  # the jitted function, e.g. "jit(step)"
    shapes: str  # input shapes and dtypes, e.g. "f32[64,64] x2, i32[16]" ("" if not logged)
    seconds: float  # backend compile time (a cache load counts too)


class CompileMonitor:
    """Context manager recording every XLA compile and persistent-cache hit inside it.

    Listens to jax.monitoring's backend-compile and cache-hit events, and to the "Compiling ...
    with global shapes and types ..." debug record of jax's lowering (for the shapes). It does not
    change what jax compiles; the logger it taps is restored on exit.
    """

    _COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
    _HIT_EVENT = "/jax/compilation_cache/cache_hits"
    _MISS_EVENT = "/jax/compilation_cache/cache_misses"
    _LOGGER = "jax._src.interpreters.pxla"

    def __init__(self) -> None:
        self.compiles: list[CompileEvent] = []
        self.cache_hits = 0
        self.cache_misses = 0
        self._pending_shapes: list[str] = []
        self._active = False
        self._handler = _ShapeHandler(self._pending_shapes)
        self._saved: tuple[int, bool] = (logging.NOTSET, True)

    def _on_event(self, event: str, **_: Any) -> None:
        if not self._active:
            return
        if event == self._HIT_EVENT:
            self.cache_hits += 1
        elif event == self._MISS_EVENT:
            self.cache_misses += 1

    def _on_duration(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        if self._active and event == self._COMPILE_EVENT:
            shapes = self._pending_shapes.pop(0) if self._pending_shapes else ""
            self.compiles.append(CompileEvent(str(kwargs.get("fun_name", "?")), shapes,
                                              duration_secs))

    def __enter__(self) -> CompileMonitor:
        import jax.monitoring

        logger = logging.getLogger(self._LOGGER)
        self._saved = (logger.level, logger.propagate)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False  # keep the debug records we asked for out of the user's logs
        logger.addHandler(self._handler)
        jax.monitoring.register_event_listener(self._on_event)
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        import jax.monitoring

        self._active = False
        jax.monitoring.unregister_event_listener(self._on_event)
        jax.monitoring.unregister_event_duration_listener(self._on_duration)
        logger = logging.getLogger(self._LOGGER)
        logger.removeHandler(self._handler)
        logger.setLevel(self._saved[0])
        logger.propagate = self._saved[1]


_AVAL = re.compile(r"ShapedArray\((\w+)\[([^\]]*)\][^()]*\)")
_DTYPE_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int32": "i32",
                "uint32": "u32", "int8": "i8", "bool": "pred", "float64": "f64", "int64": "i64"}


def compact_shapes(avals: str) -> str:
    """"(ShapedArray(float32[64]), ShapedArray(float32[64]), ...)" -> "f32[64] x2, ..."."""
    items = [f"{_DTYPE_SHORT.get(d, d)}[{dims}]" for d, dims in _AVAL.findall(avals)]
    if not items:
        return avals
    runs: list[list[Any]] = []
    for item in items:
        if runs and runs[-1][0] == item:
            runs[-1][1] += 1
        else:
            runs.append([item, 1])
    return ", ".join(item if n == 1 else f"{item} x{n}" for item, n in runs)


class _ShapeHandler(logging.Handler):
    """Collects the input shapes from jax's "Compiling <fn> with global shapes ..." records."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        # args is a mapping when the record was logged with one dict argument: not ours.
        if (record.msg.startswith("Compiling ") and isinstance(record.args, tuple)
                and len(record.args) >= 2):
            self._sink.append(compact_shapes(str(record.args[1])))


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """Memory and compile-time totals of one profiled runner.

    Param and KV bytes are global (all shards); XLA's memory analysis, and so `peak_step_bytes`,
    is per device, which is what `device_memory_bytes` bounds.
    """

    param_count: int
    param_bytes: int
    kv_bytes_per_token: int  # K and V over all layers, cache dtype
    kv_cache_bytes: int  # all pages, page 0 included
    num_pages: int  # P, page 0 (padding) included
    page_size: int  # L
    kv_capacity_tokens: int  # (P - 1) * L: page 0 holds no sequence
    max_model_len: int  # the configured context
    max_concurrent_seqs: int  # sequences that fit at full context: (P - 1) // pages per sequence
    max_num_seqs: int  # the scheduler's cap, for comparison
    peak_step_bytes: int  # the largest MemoryStats.peak_bytes over the buckets (per device)
    device_memory_bytes: int | None  # what the device has (None: unknown, e.g. CPU)
    num_buckets: int
    num_cache_hits: int
    compile_s_total: float  # lowering + compile over all buckets
    compile_s_cold: float  # ... of buckets XLA compiled (cache miss or cache off)
    compile_s_from_cache: float  # ... of buckets the persistent cache served

    @property
    def fits_device(self) -> bool | None:
        """Whether the largest step fits the device memory; None when that is unknown."""
        if self.device_memory_bytes is None:
            return None
        return self.peak_step_bytes <= self.device_memory_bytes

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"fits_device": self.fits_device}


def tree_bytes(tree: Any) -> int:
    """Total bytes of the array leaves of a pytree (arrays or ShapeDtypeStructs)."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def tree_size(tree: Any) -> int:
    """Total elements of the array leaves of a pytree."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def model_summary(*, params: Any, kv_cache: Any, num_pages: int, page_size: int,
                  max_model_len: int, max_num_seqs: int, profiles: list[BucketProfile],
                  device_memory_bytes: int | None, kv_copies: int = 1) -> ModelSummary:
    """Adds up parameter, KV and compile figures. `kv_cache` is the runner's page pools.

    `kv_copies`: stored copies of each KV head (tp / K when tensor parallelism exceeds the KV
    heads, else 1). The KV figures are the model's own (one copy), as the parameter figures
    count replicated weights once.
    """
    if num_pages < 2:
        raise ValueError(f"num_pages={num_pages!r}: must be >= 2 (page 0 is reserved)")
    if kv_copies < 1:
        raise ValueError(f"kv_copies={kv_copies!r}: must be >= 1")
    kv_cache_bytes = tree_bytes(kv_cache) // kv_copies
    pages_per_seq = -(-max_model_len // page_size)
    hit = [p for p in profiles if p.cache_hit]
    cold = [p for p in profiles if not p.cache_hit]
    total = lambda ps: sum(p.lower_s + p.compile_s for p in ps)  # noqa: E731
    return ModelSummary(
        param_count=tree_size(params), param_bytes=tree_bytes(params),
        kv_bytes_per_token=kv_cache_bytes // (num_pages * page_size),
        kv_cache_bytes=kv_cache_bytes, num_pages=num_pages, page_size=page_size,
        kv_capacity_tokens=(num_pages - 1) * page_size, max_model_len=max_model_len,
        max_concurrent_seqs=(num_pages - 1) // pages_per_seq, max_num_seqs=max_num_seqs,
        peak_step_bytes=max((p.memory.peak_bytes for p in profiles), default=0),
        device_memory_bytes=device_memory_bytes, num_buckets=len(profiles),
        num_cache_hits=len(hit), compile_s_total=total(profiles), compile_s_cold=total(cold),
        compile_s_from_cache=total(hit))

