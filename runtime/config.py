"""Frozen configuration dataclasses shared by every xlaserve component.

Each component takes the narrowest config it needs (the scheduler never sees a ModelConfig).
Every field is validated in ``__post_init__``; a bad value raises ``ValueError`` naming the field
and the value. Configs are hashable so they can be static arguments of ``jax.jit``.

This module must not import jax: the host-only scheduler and page allocator import it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

# HF `model_type` values this decoder implements, and the family each belongs to.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _require(cond: bool, field: str, value: object, why: str) -> None:
    if not cond:
        raise ValueError(f"{field}={value!r}: {why}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary embedding frequency scaling ("llama3" type from Llama 3.1+; "linear" too)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        _require(self.rope_type in ("default", "llama3", "linear"), "rope_scaling.rope_type",
                 self.rope_type, "supported types are default, llama3, linear")
        _require(self.factor > 0, "rope_scaling.factor", self.factor, "must be > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3)."""

    model_type: str  # HF model_type: llama, mistral, qwen2, qwen3
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # N, query heads
    num_kv_heads: int  # K, key/value heads (GQA when K < N)
    head_dim: int  # H
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2/2.5)
    o_proj_bias: bool = False  # o_proj carries a bias (Llama, Qwen3 with attention_bias)
    mlp_bias: bool = False  # gate/up/down projections carry biases (Llama with mlp_bias)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rope (Qwen3)
    sliding_window: int | None = None  # Mistral: attend to the last `sliding_window` keys only
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"  # weights and activations; "float32" for tests

    def __post_init__(self) -> None:
        _require(self.model_type in SUPPORTED_MODEL_TYPES, "model_type", self.model_type,
                 f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            _require(isinstance(v, int) and v > 0, name, v, "must be a positive integer")
        _require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
                 f"must divide num_heads={self.num_heads}")
        _require(self.dtype in ("bfloat16", "float32", "float16"), "dtype", self.dtype,
                 "must be bfloat16, float16 or float32")
        _require(self.sliding_window is None or self.sliding_window > 0, "sliding_window",
                 self.sliding_window, "must be None or > 0")

    @property
    def q_per_kv(self) -> int:
        """G: query heads that share one KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V cache for one token over all layers."""
        itemsize = 4 if self.dtype == "float32" else 2
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], *, dtype: str = "bfloat16") -> ModelConfig:
        """Builds a ModelConfig from a Hugging Face config.json dict.

        Args:
          hf: the parsed config.json.
          dtype: weight and activation dtype.
        Raises:
          ValueError: unsupported model_type, rope scaling, or inconsistent sizes (names the field).
        """
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:  # an explicit check narrows it to a str
            raise ValueError(f"config.json model_type={model_type!r}: "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            _require(key in hf, f"config.json {key}", None, "is missing")
        num_heads = int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rs = hf.get("rope_scaling") or None
        rope_theta = hf.get("rope_theta")
        rope_params = hf.get("rope_parameters")  # transformers >= 5 folds theta and scaling here
        if isinstance(rope_params, Mapping):
            rope_theta = rope_theta or rope_params.get("rope_theta")
            if rs is None and rope_params.get("rope_type", "default") != "default":
                rs = rope_params
        rope_scaling = RopeScaling()
        if rs:
            rope_type = rs.get("rope_type", rs.get("type", "default"))
            rope_scaling = RopeScaling(
                rope_type=rope_type,
                factor=float(rs.get("factor", 1.0)),
                low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    rs.get("original_max_position_embeddings", 8192)),
            )
        sliding_window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
            sliding_window = None  # Qwen configs carry a window they do not use by default
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # As transformers builds each family: Qwen2 always has q/k/v biases and no o_proj
            # bias; Llama and Qwen3 put attention_bias on q/k/v/o; Mistral never has biases.
            attention_bias=(model_type == "qwen2" or (model_type in ("llama", "qwen3")
                                                       and bool(hf.get("attention_bias")))),
            o_proj_bias=model_type in ("llama", "qwen3") and bool(hf.get("attention_bias")),
            mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias")),
            qk_norm=model_type == "qwen3",
            sliding_window=int(sliding_window) if sliding_window else None,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            dtype=dtype,
        )


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: page size and how many pages."""

    page_size: int = 16  # L, tokens per page
    num_pages: int | None = None  # P incl. the reserved page 0; None: from gpu_memory_utilization
    gpu_memory_utilization: float = 0.9  # fraction of device memory for weights + KV + workspace
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require(self.page_size in (8, 16, 32, 64, 128), "page_size", self.page_size,
                 "must be one of 8, 16, 32, 64, 128")
        _require(self.num_pages is None or self.num_pages >= 2, "num_pages", self.num_pages,
                 "must be >= 2 (page 0 is reserved for padding)")
        _require(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
                 self.gpu_memory_utilization, "must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits of continuous batching."""

    max_num_batched_tokens: int = 2048  # token budget per step (the largest T bucket)
    max_num_seqs: int = 64  # cap on live sequences (the largest S bucket)
    max_model_len: int = 2048  # longest prompt + output a request may reach

    def __post_init__(self) -> None:
        _require(self.max_num_batched_tokens >= 16, "max_num_batched_tokens",
                 self.max_num_batched_tokens, "must be >= 16")
        _require(self.max_num_seqs >= 1, "max_num_seqs", self.max_num_seqs, "must be >= 1")
        _require(self.max_model_len >= 2, "max_model_len", self.max_model_len, "must be >= 2")


ALL_REDUCE_MODES = ("auto", "xla", "custom", "psum")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """Device mesh sizes: `data` x `model` axes."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    # The all-reduces of the row-parallel projections (o_proj, down_proj) at tp > 1:
    #   auto    xlaserve's kernel (sharding/all_reduce.py) for decode-sized steps where it can run
    #           (GPUs of one process, tp <= 8), XLA's collective elsewhere; the choice is logged
    #   xla     XLA's collective everywhere (inserted by the partitioner)
    #   custom  like auto, but an error where the kernel cannot run
    #   psum    jax.lax.psum under shard_map (the kernel's reference; runs on CPU)
    all_reduce: str = "auto"

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1, "tensor_parallel_size",
                 self.tensor_parallel_size, "must be >= 1")
        _require(self.data_parallel_size >= 1, "data_parallel_size", self.data_parallel_size,
                 "must be >= 1")
        _require(self.all_reduce in ALL_REDUCE_MODES, "all_reduce", self.all_reduce,
                 f"must be one of {ALL_REDUCE_MODES}")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
    """Powers of two from `lo` up to `hi`, with `hi` itself last even if not a power of two."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return tuple(out)


def pages_needed(num_tokens: int, page_size: int) -> int:
    return math.ceil(num_tokens / page_size)


# pallas_kernels.ops.SKINNY_GEMM_MODES (a test keeps the two equal)
DECODE_GEMM_MODES = ("auto", "xla", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs; composes the narrow configs. Built by the CLI or `xlaserve.LLM`.

    The ModelConfig is not here: it comes from the model directory (config.json) when loading.
    """

    model: str = "builtin:tiny"  # HF directory, converted (orbax) directory, or builtin:NAME
    load_format: str = "auto"  # auto | safetensors | orbax | dummy (random weights, benchmarks)
    dtype: str = "bfloat16"
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    parallel: ParallelConfig = ParallelConfig()
    attention_impl: str = "auto"  # see pallas_kernels/ops.py
    # Decode-sized q/k/v, o_proj and down_proj products: "auto" the Pallas skinny GEMM for the
    # shapes of its measured table on GPU (pallas_kernels/skinny_gemm_tuning.json), "xla"
    # XLA's GEMMs, "pallas" the kernel for every shape it tiles (GPU), "pallas_interpret" (tests)
    decode_gemm: str = "auto"
    compilation_cache_dir: str | None = None  # None: the default under the user's cache dir
    seed: int = 0  # base seed for requests that give none

    def __post_init__(self) -> None:
        _require(self.load_format in ("auto", "safetensors", "orbax", "dummy"), "load_format",
                 self.load_format, "must be auto, safetensors, orbax or dummy")
        _require(self.dtype in ("bfloat16", "float32", "float16"), "dtype", self.dtype,
                 "must be bfloat16, float16 or float32")
        _require(self.decode_gemm in DECODE_GEMM_MODES, "decode_gemm", self.decode_gemm,
                 f"must be one of {', '.join(DECODE_GEMM_MODES)}")
