"""The Llama-family decoder: Llama 2, Llama 3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3.

One code path covers the family; the differences are config switches:
  * rope scaling "llama3"/"linear" (ModelConfig.rope_scaling), tied embeddings (Llama 3.2),
  * q/k/v bias (Qwen2), RMSNorm over head_dim on q and k before rope (Qwen3),
  * a sliding attention window (Mistral, when the config sets one).

Prefill and decode share one ragged, paged path: every step writes the new tokens' K/V into
their slots (``ops.write_kv_pages``) and attends through the page table
(``ops.ragged_paged_attention``). The KV cache is a tuple of per-layer (k_pages, v_pages) arrays,
each [K, P, L, H], so a donated cache is updated in place. The attention step is one replaceable
function (`AttentionFn`) so the sharding code can wrap it (e.g. in shard_map) without touching the
model. Likewise the row-parallel projections o_proj and down_proj are not computed where they
appear: each block returns them as a `layers.Deferred` product, and the next norm
(`layers.ResidualRMSNorm`: the residual add, then RMSNorm) computes them, through the optional
`RowParallelFn` (the sharding code's local product + all-reduce, fused with the add and the norm
where it can) or as a plain product. This module never names mesh axes and never calls jit
itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.pallas_kernels import ops
from xlaserve.runtime.batch import StepInputs
from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models.layers import (
    AddRMSNormFn,
    Deferred,
    Embed,
    Projection,
    ProjectFn,
    ResidualRMSNorm,
    RMSNorm,
    SwiGLU,
    SwiGLUFn,
    apply_rope,
    as_array,
    as_deferred,
    rope_inv_freq,
    rope_tables,
)

# Per layer (k_pages, v_pages), each [K, P, L, H]: KV head, page, slot in page, head dim.
KVCache = tuple[tuple[jax.Array, jax.Array], ...]
Params = dict[str, Any]  # nested dict of arrays (unboxed), as built by init_params / the loaders


class AttentionFn(Protocol):
    """Writes this step's K/V into the pages, then attends.

    k_new and v_new None: they are already in the pages (a `RopeWriteFn` stored them); only
    attend. Returns (o [T, N, H], k_pages, v_pages).
    """

    def __call__(self, q: jax.Array, k_new: jax.Array | None, v_new: jax.Array | None,
                 k_pages: jax.Array, v_pages: jax.Array, inputs: StepInputs, *, sm_scale: float,
                 sliding_window: int | None) -> tuple[jax.Array, jax.Array, jax.Array]: ...


@runtime_checkable
class RopeWriteFn(Protocol):
    """A `layers.ProjectFn` that can also finish q/k/v in one launch after their GEMM: rope on
    q and k (cos, sin f32[T, H/2]) and this step's K/V stored into the layer's pages at
    `slot_mapping` (sharding.decode_gemm.DecodeProjection, pallas_kernels/rope_write_kv.py). `rows`
    (i32[1], `real_rows`): the rows after it are padding, whose q may be zeros and whose K/V
    need not be stored (page 0 is the padding page).

    Returns (q [T, N, H] with rope, k_pages, v_pages), or None where it does not apply (the
    model then calls it as a plain ProjectFn, applies rope and lets attention_fn write)."""

    def __call__(self, products: Sequence[Deferred], dtype: jnp.dtype,
                 ) -> tuple[jax.Array, ...]: ...

    def rope_write(self, products: Sequence[Deferred], dtype: jnp.dtype, cos: jax.Array,
                   sin: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                   slot_mapping: jax.Array, rows: jax.Array,
                   ) -> tuple[jax.Array, jax.Array, jax.Array] | None: ...


# residual + o_proj / down_proj, then the next RMSNorm (layers.AddRMSNormFn): the hook the
# sharding code implements for tensor parallelism (its explicit all-reduce, fused where it can).
RowParallelFn = AddRMSNormFn


def paged_attention(q: jax.Array, k_new: jax.Array | None, v_new: jax.Array | None,
                    k_pages: jax.Array, v_pages: jax.Array, inputs: StepInputs, *, sm_scale: float,
                    sliding_window: int | None, impl: str = "auto",
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The default AttentionFn: ops.write_kv_pages then ops.ragged_paged_attention.

    Args:
      q: [T, N, H] queries (rope applied). k_new, v_new: [T, K, H] this step's keys and values
        (None: already in the pages).
      k_pages, v_pages: [K, P, L, H] the layer's page pools.
      inputs: the step's ragged metadata (slot_mapping, kv_lens, page_table, cu_q_lens, num_seqs).
    Returns:
      (o [T, N, H], updated k_pages, updated v_pages).
    """
    # The metadata are numpy on the host and already device arrays under jit, where asarray
    # is a no-op; the kernels take device arrays.
    if k_new is not None:
        if v_new is None:
            raise ValueError("v_new=None with k_new given: pass both or neither")
        k_pages, v_pages = ops.write_kv_pages(k_pages, v_pages, k_new, v_new,
                                              jnp.asarray(inputs.slot_mapping))
    o = ops.ragged_paged_attention(
        q, k_pages, v_pages, jnp.asarray(inputs.kv_lens), jnp.asarray(inputs.page_table),
        jnp.asarray(inputs.cu_q_lens), jnp.asarray(inputs.num_seqs), sm_scale=sm_scale,
        sliding_window=sliding_window, impl=impl)
    return o, k_pages, v_pages


def real_rows(inputs: StepInputs) -> jax.Array:
    """i32[1]: the step's token rows before the padding (cu_q_lens[num_seqs])."""
    return jax.lax.dynamic_slice(inputs.cu_q_lens, inputs.num_seqs, (1,))


def _dtype(cfg: ModelConfig) -> jnp.dtype:
    return jnp.dtype(cfg.dtype)


class Attention(nn.Module):
    """Self-attention over the paged cache: q/k/v projections, (qk norm), rope, attention, o.

    Returns o_proj's output as a `Deferred` product (an array when o_proj has a bias)."""

    cfg: ModelConfig
    attention_fn: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
    project_fn: ProjectFn | None = None

    @nn.compact
    def __call__(self, x: jax.Array, inputs: StepInputs, k_pages: jax.Array, v_pages: jax.Array,
                 rows: jax.Array) -> tuple[jax.Array | Deferred, jax.Array, jax.Array]:
        """rows: i32[1], the step's real token rows (`real_rows`)."""
        cfg, dt = self.cfg, _dtype(self.cfg)
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        project_fn = None if bias else self.project_fn  # one hook call for q, k and v
        defer = project_fn is not None  # the projections stay Deferred for the hook
        q = Projection((d,), (n, h), ("embed",), ("q_heads", "head_dim"), dt, bias, defer,
                       name="q_proj")(x)  # [T, N, H]
        k_new = Projection((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), dt, bias, defer,
                           name="k_proj")(x)  # [T, K, H]
        v_new = Projection((d,), (k, h), ("embed",), ("kv_heads", "head_dim"), dt, bias, defer,
                           name="v_proj")(x)  # [T, K, H]
        inv_freq = rope_inv_freq(h, cfg.rope_theta, cfg.rope_scaling)
        written = None  # (q with rope, k_pages, v_pages) when the hook stored this step's K/V
        if project_fn is not None:
            products = (as_deferred(q), as_deferred(k_new), as_deferred(v_new))
            if not cfg.qk_norm and isinstance(project_fn, RopeWriteFn):
                cos, sin = rope_tables(inputs.positions, inv_freq)
                written = project_fn.rope_write(products, dt, cos, sin, k_pages, v_pages,
                                                jnp.asarray(inputs.slot_mapping), rows)
            if written is None:
                q, k_new, v_new = project_fn(products, dt)
        if written is not None:
            q, k_pages, v_pages = written
            k_new = v_new = None
        else:
            q, k_new, v_new = as_array(q), as_array(k_new), as_array(v_new)
            if cfg.qk_norm:
                q = RMSNorm(h, cfg.rms_norm_eps, dt, name="q_norm")(q)
                k_new = RMSNorm(h, cfg.rms_norm_eps, dt, name="k_norm")(k_new)
            q = apply_rope(q, inputs.positions, inv_freq)
            k_new = apply_rope(k_new, inputs.positions, inv_freq)
        with jax.named_scope("paged_attention"):
            o, k_pages, v_pages = self.attention_fn(
                q, k_new, v_new, k_pages, v_pages, inputs, sm_scale=h ** -0.5,
                sliding_window=cfg.sliding_window)  # o: [T, N, H]
        out = Projection((n, h), (d,), ("q_heads", "head_dim"), ("embed",), dt,
                         cfg.o_proj_bias, defer=True, name="o_proj")(o)  # [T, D]
        return out, k_pages, v_pages


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)).

    Takes and returns the residual stream x and the previous block's output not yet added to it
    (`delta`: None before the first layer, else the MLP's deferred down_proj): its input norm
    adds it, so each norm is one residual-add-then-norm step (fused under tp)."""

    cfg: ModelConfig
    attention_fn: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
    row_parallel_fn: RowParallelFn | None = None
    project_fn: ProjectFn | None = None

    @nn.compact
    def __call__(self, x: jax.Array, delta: jax.Array | Deferred | None, inputs: StepInputs,
                 k_pages: jax.Array, v_pages: jax.Array, rows: jax.Array,
                 ) -> tuple[jax.Array, jax.Array | Deferred, jax.Array, jax.Array]:
        """rows: i32[1], the step's real token rows (`real_rows`, computed once per step)."""
        cfg, dt = self.cfg, _dtype(self.cfg)
        d, eps, add_norm = cfg.hidden_size, cfg.rms_norm_eps, self.row_parallel_fn
        with jax.named_scope("attention"):
            x, h = ResidualRMSNorm(d, eps, dt, add_norm, name="input_norm")(x, delta, rows)
            a, k_pages, v_pages = Attention(cfg, self.attention_fn, self.project_fn,
                                            name="attn")(
                h, inputs, k_pages, v_pages, rows)
        with jax.named_scope("mlp"):
            x, h = ResidualRMSNorm(d, eps, dt, add_norm, name="post_attn_norm")(x, a, rows)
            swiglu_fn = self.project_fn if isinstance(self.project_fn, SwiGLUFn) else None
            m = SwiGLU(d, cfg.intermediate_size, dt, cfg.mlp_bias, defer_down=True,
                       swiglu_fn=swiglu_fn, name="mlp")(h)
        return x, m, k_pages, v_pages


class Llama(nn.Module):
    """The whole decoder. `__call__` gives final-normed hidden states; `logits` projects them."""

    cfg: ModelConfig
    attention_fn: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
    row_parallel_fn: RowParallelFn | None = None
    project_fn: ProjectFn | None = None

    def setup(self) -> None:
        cfg, dt = self.cfg, _dtype(self.cfg)
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, dt)
        self.layers = [DecoderLayer(cfg, self.attention_fn, self.row_parallel_fn,
                                    self.project_fn, name=f"layers_{i}")
                       for i in range(cfg.num_layers)]
        self.final_norm = ResidualRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt,
                                          self.row_parallel_fn)
        if not cfg.tie_word_embeddings:
            self.lm_head = Projection((cfg.hidden_size,), (cfg.vocab_size,), ("embed",),
                                      ("vocab",), dt)

    def __call__(self, inputs: StepInputs, kv_cache: KVCache) -> tuple[jax.Array, KVCache]:
        inputs = jax.tree.map(jnp.asarray, inputs)  # numpy inputs work eagerly too
        with jax.named_scope("embed"):
            x = self.embed(inputs.token_ids)  # [T, D]
        new_cache = []
        # The last block's output, added to x by the next norm. So in traces o_proj's product
        # sits under layer_i/mlp and down_proj's under layer_{i+1}/attention (or final_norm).
        delta = None
        rows = real_rows(inputs)  # i32[1]: the rows after it are padding
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                k_pages, v_pages = kv_cache[i]
                x, delta, k_pages, v_pages = layer(x, delta, inputs, k_pages, v_pages, rows)
                new_cache.append((k_pages, v_pages))
        with jax.named_scope("final_norm"):
            _, x = self.final_norm(x, delta, rows)
        return x, tuple(new_cache)

    def logits(self, hidden: jax.Array) -> jax.Array:  # [..., D] -> f32[..., V]
        with jax.named_scope("lm_head"):
            if self.cfg.tie_word_embeddings:
                return self.embed.attend(hidden).astype(jnp.float32)
            return as_array(self.lm_head(hidden)).astype(jnp.float32)

    def init_all(self, inputs: StepInputs, kv_cache: KVCache) -> jax.Array:
        """Touches every parameter (used only by `init`)."""
        hidden, _ = self(inputs, kv_cache)
        return self.logits(hidden)


def _model(cfg: ModelConfig, attention_impl: str, attention_fn: AttentionFn | None,
           row_parallel_fn: RowParallelFn | None = None,
           project_fn: ProjectFn | None = None) -> Llama:
    if attention_fn is None:
        attention_fn = functools.partial(paged_attention, impl=attention_impl)
    return Llama(cfg, attention_fn, row_parallel_fn, project_fn)


def forward_hidden(params: Params, inputs: StepInputs, kv_cache: KVCache, cfg: ModelConfig, *,
                   attention_impl: str = "auto", attention_fn: AttentionFn | None = None,
                   row_parallel_fn: RowParallelFn | None = None,
                   project_fn: ProjectFn | None = None) -> tuple[jax.Array, KVCache]:
    """Runs the decoder over all scheduled tokens; returns (final-normed hidden [T, D], cache).

    `attention_fn` replaces the default write-pages-then-attend step (for sharding wrappers and
    tests); `attention_impl` picks the ops.ragged_paged_attention implementation otherwise.
    `row_parallel_fn` computes o_proj and down_proj with the residual add and norm after each
    (the sharding plan's explicit all-reduce, fused where it can); `project_fn` computes q_proj,
    k_proj and v_proj together (bias-free models; the plan's decode GEMM).
    """
    if len(kv_cache) != cfg.num_layers:
        raise ValueError(f"kv_cache has {len(kv_cache)} layers, config has "
                         f"num_layers={cfg.num_layers}")
    model = _model(cfg, attention_impl, attention_fn, row_parallel_fn, project_fn)
    # Without `mutable`, apply returns the method's output alone (not an (out, state) pair).
    return cast(tuple[jax.Array, KVCache], model.apply({"params": params}, inputs, kv_cache))


def compute_logits(params: Params, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Projects final-normed hidden states [..., D] to float32 logits [..., V]."""
    model = _model(cfg, "auto", None)
    # Without `mutable`, apply returns the method's output alone (not an (out, state) pair).
    return cast(jax.Array, model.apply({"params": params}, hidden, method=Llama.logits))


def forward(params: Params, inputs: StepInputs, kv_cache: KVCache, cfg: ModelConfig, *,
            attention_impl: str = "auto", attention_fn: AttentionFn | None = None,
            row_parallel_fn: RowParallelFn | None = None,
            project_fn: ProjectFn | None = None) -> tuple[jax.Array, KVCache]:
    """One step: returns (f32 logits [S, V] at inputs.logits_indices, updated KV cache).

    Pure and jittable with `cfg`, `attention_impl` and `attention_fn` static. Donate `kv_cache`
    so the page pools are updated in place.
    """
    hidden, kv_cache = forward_hidden(params, inputs, kv_cache, cfg,
                                      attention_impl=attention_impl, attention_fn=attention_fn,
                                      row_parallel_fn=row_parallel_fn,
                                      project_fn=project_fn)
    selected = jnp.take(hidden, inputs.logits_indices, axis=0)  # [S, D]
    return compute_logits(params, selected, cfg), kv_cache


def init_kv_cache(cfg: ModelConfig, num_pages: int, page_size: int, *, dtype: Any = None,
                  sharding: jax.sharding.Sharding | None = None,
                  num_heads: int | None = None) -> KVCache:
    """Zeroed page pools, one (k_pages, v_pages) pair of [K, P, L, H] per layer.

    Args:
      num_pages: P, including the reserved padding page 0.
      page_size: L, tokens per page.
      dtype: cache dtype (default cfg.dtype).
      sharding: applied to every array; the arrays are created directly with it.
      num_heads: stored heads (default cfg.num_kv_heads, K). A sharding plan whose tp exceeds K
        stores tp heads, one per device (`sharding.rules.kv_cache_heads`).
    """
    if num_pages < 1:
        raise ValueError(f"num_pages={num_pages}: must be >= 1")
    if page_size < 1:
        raise ValueError(f"page_size={page_size}: must be >= 1")
    heads = cfg.num_kv_heads if num_heads is None else num_heads
    if heads < 1:
        raise ValueError(f"num_heads={num_heads}: must be >= 1")
    shape = (heads, num_pages, page_size, cfg.head_dim)
    dt = jnp.dtype(dtype) if dtype is not None else _dtype(cfg)
    make = functools.partial(jnp.zeros, shape, dt)
    if sharding is not None:
        make = jax.jit(make, out_shardings=sharding)
    return tuple((make(), make()) for _ in range(cfg.num_layers))


def _dummy_step(cfg: ModelConfig) -> tuple[StepInputs, KVCache]:
    """A one-token step used only to trace `init` (its compute is dead code and removed)."""
    i32 = functools.partial(np.zeros, dtype=np.int32)
    inputs = StepInputs(token_ids=i32(1), positions=i32(1), slot_mapping=i32(1),
                        cu_q_lens=np.array([0, 1], np.int32), kv_lens=np.ones(1, np.int32),
                        page_table=i32((1, 1)), num_seqs=np.ones(1, np.int32),
                        logits_indices=i32(1))
    shape = (cfg.num_kv_heads, 1, 1, cfg.head_dim)
    cache = tuple((jnp.zeros(shape, _dtype(cfg)), jnp.zeros(shape, _dtype(cfg)))
                  for _ in range(cfg.num_layers))
    return inputs, cache


def _init_boxed(cfg: ModelConfig, rng: jax.Array) -> Any:
    inputs, cache = _dummy_step(cfg)
    model = _model(cfg, "reference", None)
    return model.init(rng, inputs, cache, method=Llama.init_all)["params"]


@functools.partial(jax.jit, static_argnums=0)
def _init_unboxed(cfg: ModelConfig, rng: jax.Array) -> Params:
    return nn.meta.unbox(_init_boxed(cfg, rng))


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Random parameters (normal(0.02) kernels, unit norms, zero biases) in cfg.dtype.

    Jittable: ``jax.jit(partial(init_params, cfg), out_shardings=...)(rng)`` creates them on
    the devices, already sharded. Called eagerly it is still compiled (once per config), which
    is much faster than running flax's init op by op.
    """
    return _init_unboxed(cfg, rng)


def abstract_params(cfg: ModelConfig) -> Params:
    """ShapeDtypeStructs of every parameter (jax.eval_shape: allocates nothing)."""
    return jax.eval_shape(functools.partial(init_params, cfg), jax.random.key(0))


def param_logical_axes(cfg: ModelConfig) -> Params:
    """Same structure as the params; each leaf a tuple of logical axis names (or None).

    The leaves are tuples, which jax treats as pytree nodes: map over this tree together with the
    params as ``jax.tree.map(f, axes, params, is_leaf=lambda x: isinstance(x, tuple))``.
    """
    boxed = jax.eval_shape(functools.partial(_init_boxed, cfg), jax.random.key(0))
    return jax.tree.map(lambda b: tuple(b.names), boxed,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def count_params(cfg: ModelConfig) -> int:
    """Number of parameters (from shapes only)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(cfg)))
