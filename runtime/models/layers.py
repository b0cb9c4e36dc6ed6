"""Building blocks of the Llama-family decoder: RMSNorm, rotary embedding, projections, SwiGLU MLP.

Every parameter is declared once, here, with its shape, initializer and logical axis names
(``nn.with_logical_partitioning``); the sharding rules map those names to mesh axes. Nothing in
this module names a mesh axis, touches the KV cache, or knows about pages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlaserve.runtime.config import RopeScaling

if TYPE_CHECKING:
    import numpy as np

# Logical axis names used by model parameters (sharding/rules.py maps them to mesh axes).
LOGICAL_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm")

_KERNEL_INIT = nn.initializers.normal(stddev=0.02)


def _param(module: nn.Module, name: str, init: nn.initializers.Initializer,
           shape: Sequence[int], axes: tuple[str | None, ...], dtype: jnp.dtype) -> jax.Array:
    """Declares one parameter with its logical axes (one place for shape, dtype, axes, init)."""
    if len(axes) != len(shape):
        raise ValueError(f"param {name}: axes {axes} do not match shape {tuple(shape)}")
    # unbox=True is flax's default; passing it picks the overload that returns the unboxed
    # array rather than the LogicallyPartitioned box the initializer makes.
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype,
                        unbox=True)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, computed in float32 (as HF does), rounded to x's dtype,
    then times `scale` (rounded again)."""
    x32 = x.astype(jnp.float32)
    var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + eps)
    return (y.astype(x.dtype) * scale).astype(x.dtype)


def add_rms_norm(residual: jax.Array, delta: jax.Array, scale: jax.Array,
                 eps: float) -> tuple[jax.Array, jax.Array]:
    """(residual + delta, rms_norm of that sum): the pre-norm block's join, unfused."""
    x = residual + delta
    return x, rms_norm(x, scale, eps)


class RMSNorm(nn.Module):
    """rms_norm(x, scale) (the q/k norms of Qwen3; the blocks' norms are ResidualRMSNorm)."""

    dim: int
    eps: float
    dtype: jnp.dtype
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", nn.initializers.ones, (self.dim,), (self.axis_name,),
                       self.dtype)
        return rms_norm(x, scale, self.eps)


def contract(x: jax.Array, kernel: jax.Array, n_in: int, out_dtype: jnp.dtype) -> jax.Array:
    """x [T, *in] . kernel [*in, *out] -> [T, *out]: x's trailing n_in dims with the kernel's
    leading ones, accumulated in float32, returned in `out_dtype`."""
    return jax.lax.dot_general(
        x, kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())),
        preferred_element_type=out_dtype)


@dataclasses.dataclass(frozen=True)
class Deferred:
    """A bias-free projection x [T, *in] . kernel [*in, *out] not computed yet: the next
    ResidualRMSNorm adds it to the residual stream, so that a sharding hook (`AddRMSNormFn`) can
    run the product, its all-reduce, the add and the norm as one step (o_proj, down_proj)."""

    x: jax.Array
    kernel: jax.Array
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]

    def compute(self, dtype: jnp.dtype) -> jax.Array:
        return contract(self.x, self.kernel, len(self.in_axes), dtype)


def as_array(y: jax.Array | Deferred) -> jax.Array:
    """`y` from a Projection that computes its product (no `defer`, or a bias)."""
    if isinstance(y, Deferred):
        raise TypeError("expected a computed projection, got a Deferred product")
    return y


def as_deferred(y: jax.Array | Deferred) -> Deferred:
    """`y` from a bias-free Projection with `defer`."""
    if not isinstance(y, Deferred):
        raise TypeError(f"expected a Deferred product, got {type(y).__name__}")
    return y


class AddRMSNormFn(Protocol):
    """residual [T, D] + x . kernel (a bias-free projection into D, in the model dtype), then
    rms_norm of that sum: returns (the sum, the normed sum). `in_axes` / `out_axes` are the
    kernel's logical axis names. `rows` (i32[1] or None): how many leading rows carry tokens;
    the outputs of the others (padding) are unspecified, so a hook may skip them. The sharding
    code's row-parallel hook implements it."""

    def __call__(self, residual: jax.Array, x: jax.Array, kernel: jax.Array,
                 in_axes: tuple[str | None, ...], out_axes: tuple[str | None, ...],
                 scale: jax.Array, eps: float, rows: jax.Array | None = None,
                 ) -> tuple[jax.Array, jax.Array]: ...


class ProjectFn(Protocol):
    """Several bias-free projections of the same x ([T, *in], the `Deferred` products of q_proj,
    k_proj and v_proj), each returned in `dtype`: one launch where the sharding code can (a
    decode-sized step's skinny GEMM, sharding.decode_gemm.DecodeProjection)."""

    def __call__(self, products: Sequence[Deferred], dtype: jnp.dtype,
                 ) -> tuple[jax.Array, ...]: ...


@runtime_checkable
class SwiGLUFn(Protocol):
    """silu(x . gate) * (x . up) of two bias-free `Deferred` projections of the same x [T, D],
    in `dtype`, in one launch (a decode-sized step's gate/up GEMM with the activation as its
    epilogue: sharding.decode_gemm.DecodeProjection), or None where that does not apply (the
    MLP then computes both products and the activation itself)."""

    def swiglu(self, gate: Deferred, up: Deferred, dtype: jnp.dtype) -> jax.Array | None: ...


class ResidualRMSNorm(nn.Module):
    """The pre-norm block's join: x = residual + delta, then (x, rms_norm(x) * scale).

    `delta` is the previous block's output (an array, a `Deferred` projection, or None before
    the first block: then only the norm). With `add_norm_fn` a Deferred delta goes to it whole.
    Its parameter is "scale", as RMSNorm's.
    """

    dim: int
    eps: float
    dtype: jnp.dtype
    add_norm_fn: AddRMSNormFn | None = None

    @nn.compact
    def __call__(self, residual: jax.Array, delta: jax.Array | Deferred | None,
                 rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """`rows`: i32[1], the leading rows that carry tokens (for `add_norm_fn`, which may
        leave the padding rows after them unspecified)."""
        scale = _param(self, "scale", nn.initializers.ones, (self.dim,), ("norm",), self.dtype)
        if delta is None:
            return residual, rms_norm(residual, scale, self.eps)
        if isinstance(delta, Deferred):
            if self.add_norm_fn is not None:
                return self.add_norm_fn(residual, delta.x, delta.kernel, delta.in_axes,
                                        delta.out_axes, scale, self.eps, rows=rows)
            delta = delta.compute(self.dtype)
        return add_rms_norm(residual, delta, scale, self.eps)


class Projection(nn.Module):
    """A linear map whose input and output may each span several named axes.

    ``kernel`` has shape ``in_shape + out_shape``; the optional ``bias`` has shape ``out_shape``.
    Example: the q projection maps [T, D] to [T, N, H] with kernel [D, N, H].

    With ``defer`` and no bias it returns a `Deferred` product instead (o_proj and down_proj:
    the next ResidualRMSNorm computes it, fused with the residual add where the sharding code
    can). With a bias the plain contraction runs (under tp the partitioner inserts the
    collective).
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    dtype: jnp.dtype
    use_bias: bool = False
    defer: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | Deferred:
        kernel = _param(self, "kernel", _KERNEL_INIT, self.in_shape + self.out_shape,
                        self.in_axes + self.out_axes, self.dtype)
        if self.defer and not self.use_bias:
            return Deferred(x, kernel, self.in_axes, self.out_axes)
        # The product accumulates in float32 either way; its output is in the model dtype
        # unless a bias follows, so that under tensor parallelism the row-parallel projections
        # (o, down) all-reduce bf16 partial sums (half the bytes), as HF and vLLM do.
        y = contract(x, kernel, len(self.in_shape),
                     jnp.float32 if self.use_bias else self.dtype)
        if self.use_bias:
            bias = _param(self, "bias", nn.initializers.zeros, self.out_shape, self.out_axes,
                          self.dtype)
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` gives logits against it (tied embeddings)."""

    vocab_size: int
    dim: int
    dtype: jnp.dtype

    def setup(self) -> None:
        self.embedding = _param(self, "embedding", _KERNEL_INIT, (self.vocab_size, self.dim),
                                ("vocab", "embed"), self.dtype)

    def __call__(self, token_ids: jax.Array | np.ndarray) -> jax.Array:  # [T] -> [T, D]
        return jnp.take(self.embedding, token_ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:  # [..., D] -> f32[..., V]
        return jnp.einsum("...d,vd->...v", x, self.embedding, preferred_element_type=jnp.float32)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the Llama/Mistral/Qwen MLP (biases: Llama's mlp_bias).
    With `swiglu_fn` (and no bias) gate, up and the activation go to the hook in one call."""

    dim: int
    hidden: int
    dtype: jnp.dtype
    use_bias: bool = False
    defer_down: bool = False  # down_proj's Projection.defer
    swiglu_fn: SwiGLUFn | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | Deferred:  # [T, D] -> [T, D]
        fn = None if self.use_bias else self.swiglu_fn
        gate, up = (Projection((self.dim,), (self.hidden,), ("embed",), ("mlp",), self.dtype,
                               self.use_bias, fn is not None, name=name)(x)
                    for name in ("gate_proj", "up_proj"))
        h = None if fn is None else fn.swiglu(as_deferred(gate), as_deferred(up), self.dtype)
        if h is None:
            g, u = (p.compute(self.dtype) if isinstance(p, Deferred) else p for p in (gate, up))
            h = (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(self.dtype)
        return Projection((self.hidden,), (self.dim,), ("mlp",), ("embed",), self.dtype,
                          self.use_bias, self.defer_down, name="down_proj")(h)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> jax.Array:
    """Inverse frequencies f32[H/2] with the config's scaling applied (HF's definitions).

    "linear" divides every frequency by `factor`; "llama3" (Llama 3.1+) divides only the low
    frequencies, keeps the high ones, and blends smoothly in between.
    """
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling.rope_type == "linear":
        return inv / scaling.factor
    if scaling.rope_type == "llama3":
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * jnp.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / scaling.factor, inv)
        smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
                  / (scaling.high_freq_factor - scaling.low_freq_factor))
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, blended, scaled)
    return inv


def rope_tables(positions: jax.Array | np.ndarray, inv_freq: jax.Array,
                ) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) f32[T, H/2] of the rotation angles of positions i32[T]."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, positions: jax.Array | np.ndarray, inv_freq: jax.Array,
               ) -> jax.Array:
    """Rotates x [T, heads, H] by its positions i32[T] (the half-split layout HF Llama uses)."""
    cos, sin = rope_tables(positions, inv_freq)
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, H/2]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
