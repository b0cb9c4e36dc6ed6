"""q/k/v epilogue of a decode-sized step: split-K sum, rotary embedding, and the K/V write.

After the skinny GEMM (pallas_kernels/skinny_gemm.py) has produced q_proj, k_proj and v_proj
of the step's tokens as float32 split-K partials, this one launch finishes the three
projections::

    y      = round(sum over s of parts[s])          (float32, in order; rounded to `dtype`)
    q      = rope(y[:, q heads])                    -> out [T, N, H]
    k, v   = rope(y[:, k heads]), y[:, v heads]     -> stored into their slots of the pages

which is what `parts.sum(0).astype(dtype)`, `layers.apply_rope` and `write_kv_pages` compute
one after the other. Why: in a batch-1 decode step of the 8B model these were four kernels per
layer (q rope, k rope, the v slice and the K/V write, each also reading the partials) of
1.3-1.6 us each plus a launch gap each (bench/results/session12_h200x2).

Layouts:
  parts         f32[S, T, (N + 2K) * H]  the partials of [q | k | v] side by side (heads, then
                                         head dim), as the skinny GEMM writes them
  cos, sin      f32[T, H / 2]            rope's tables for the tokens' positions
  slot_mapping  i32[T]                   page * L + offset of each token (unused for padding
                                         rows: their K/V are not stored)
  rows          i32[1]                   the real token rows (the rows after them are padding)
  k/v_pages     [K, P, L, H]             the layer's pools, updated in place (aliased: the
                                         caller's jit must donate them)
  out           [T, N, H]                q with rope applied, in `dtype`

Rope is the half-split layout of HF Llama: x1 = x[..., :H/2], x2 = x[..., H/2:],
out = [x1 cos - x2 sin, x2 cos + x1 sin] in float32, rounded to the dtype.

Algorithm: grid (T, N + K); program (t, j) owns token t's q head j (j < N), or its k and v
head j - N. Every head is loaded as two [H/2] halves from each of the S partials, summed,
rounded, rotated and stored (q to out, k and v to the slot). Rows from `rows` (the step's real
token count) on are padding: their programs store zeros to q and nothing to the pages.

Constraints: N % K == 0; H / 2 a power of two (Triton's vector shapes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from xlaserve.pallas_kernels import pdl
from xlaserve.pallas_kernels.ragged_paged_attention import compiler_params


def _rope_write_kv_kernel(
    rows_ref,  # i32[1]: the leading token rows that are real (the others are padding)
    slot_ref,  # i32[T]
    parts_ref,  # f32[S, T, N + 2K, H]
    cos_ref,  # f32[T, H/2]
    sin_ref,  # f32[T, H/2]
    k_in_ref,  # [K, P, L, H] (aliased to k_out_ref; not read)
    v_in_ref,  # [K, P, L, H] (aliased to v_out_ref; not read)
    q_ref,  # [T, N, H]
    k_out_ref,  # [K, P, L, H]
    v_out_ref,  # [K, P, L, H]
    *,
    num_splits: int,
    num_q_heads: int,
    num_kv_heads: int,
    half: int,
    page_size: int,
    early_launch: bool,
):
    """One program: token t's q head j (j < N), or its k and v head j - N (stored to the slot).
    Padding rows (t >= rows) store zeros to q and nothing to the pages."""
    del k_in_ref, v_in_ref
    if early_launch:
        pdl.launch_dependents()
    t, j = pl.program_id(0), pl.program_id(1)
    dtype = q_ref.dtype
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    real = t < rows_ref[0]

    def head(col, part):  # the head's half `part`, summed over the splits and rounded
        acc = parts_ref[0, t, col, part]
        for s in range(1, num_splits):
            acc = acc + parts_ref[s, t, col, part]
        return acc.astype(dtype).astype(jnp.float32)

    def rotated(col):
        cos, sin = cos_ref[t, :], sin_ref[t, :]
        x1, x2 = head(col, lo), head(col, hi)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    @pl.when(j < num_q_heads)
    def _():
        @pl.when(real)
        def _():
            r1, r2 = rotated(j)
            q_ref[t, j, lo] = r1.astype(dtype)
            q_ref[t, j, hi] = r2.astype(dtype)

        @pl.when(jnp.logical_not(real))
        def _():
            zeros = jnp.zeros((half,), dtype)
            q_ref[t, j, lo] = zeros
            q_ref[t, j, hi] = zeros

    @pl.when((j >= num_q_heads) & real)
    def _():
        kh = j - num_q_heads
        slot = slot_ref[t]
        page, offset = slot // page_size, slot % page_size
        k1, k2 = rotated(j)
        k_out_ref[kh, page, offset, lo] = k1.astype(dtype).astype(k_out_ref.dtype)
        k_out_ref[kh, page, offset, hi] = k2.astype(dtype).astype(k_out_ref.dtype)
        v = j + num_kv_heads
        v_out_ref[kh, page, offset, lo] = head(v, lo).astype(v_out_ref.dtype)
        v_out_ref[kh, page, offset, hi] = head(v, hi).astype(v_out_ref.dtype)


def check_shapes(parts: jax.Array, cos: jax.Array, sin: jax.Array, slot_mapping: jax.Array,
                 k_pages: jax.Array, v_pages: jax.Array, num_q_heads: int) -> None:
    """Raises ValueError naming the argument whose shape or dtype does not fit."""
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"rope_write_kv: k_pages and v_pages must both be [K, P, L, H], got "
                         f"{k_pages.shape} and {v_pages.shape}")
    k_heads, _, _, h = k_pages.shape
    if h % 2 or (h // 2) & (h // 2 - 1):
        raise ValueError(f"rope_write_kv: head_dim={h}: H/2 must be a power of two")
    if num_q_heads % k_heads:
        raise ValueError(f"rope_write_kv: num_q_heads={num_q_heads} is not a multiple of the "
                         f"pages' KV heads {k_heads}")
    t = slot_mapping.shape[0]
    width = (num_q_heads + 2 * k_heads) * h
    if parts.ndim != 3 or parts.shape[1:] != (t, width) or parts.dtype != jnp.float32:
        raise ValueError(f"rope_write_kv: parts {parts.shape} {parts.dtype} must be float32 "
                         f"[S, T={t}, (N + 2K) * H = {width}]")
    if cos.shape != (t, h // 2) or sin.shape != cos.shape:
        raise ValueError(f"rope_write_kv: cos {cos.shape} and sin {sin.shape} must be "
                         f"[T={t}, H/2={h // 2}]")
    if slot_mapping.ndim != 1 or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"rope_write_kv: slot_mapping must be i32[T], got "
                         f"{slot_mapping.shape} {slot_mapping.dtype}")


@functools.partial(jax.jit, static_argnames=("num_q_heads", "dtype", "interpret"))
def rope_write_kv(
    parts: jax.Array,  # f32[S, T, (N + 2K) * H]
    cos: jax.Array,  # f32[T, H/2]
    sin: jax.Array,  # f32[T, H/2]
    slot_mapping: jax.Array,  # i32[T]
    k_pages: jax.Array,  # [K, P, L, H]
    v_pages: jax.Array,  # [K, P, L, H]
    rows: jax.Array | None = None,  # i32[1]: real token rows (default all T)
    *,
    num_q_heads: int,
    dtype: jnp.dtype,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q [T, N, H] with rope, k_pages, v_pages with this step's K/V stored): see the module
    docstring. The pools are aliased to the outputs (donate them, or XLA copies the pools).
    Rows from `rows` on are padding: q is zero there and their K/V are not stored.

    Raises:
      ValueError: shapes or dtypes that do not fit (named).
    """
    check_shapes(parts, cos, sin, slot_mapping, k_pages, v_pages, num_q_heads)
    k_heads, num_pages, page_size, h = k_pages.shape
    s, t = parts.shape[:2]
    heads = num_q_heads + 2 * k_heads
    slots = jnp.clip(slot_mapping, 0, num_pages * page_size - 1)  # never write out of the pool
    if rows is None:
        rows = jnp.full((1,), t, jnp.int32)
    pool_spec = pl.BlockSpec(k_pages.shape, lambda i, j: (0, 0, 0, 0))
    whole = lambda *shape: pl.BlockSpec(shape, lambda i, j: (0,) * len(shape))  # noqa: E731
    kernel = functools.partial(
        _rope_write_kv_kernel, num_splits=s, num_q_heads=num_q_heads, num_kv_heads=k_heads,
        half=h // 2, page_size=page_size, early_launch=pdl.enabled(interpret, "rope_write_kv"))
    return pl.pallas_call(
        kernel,
        grid=(t, num_q_heads + k_heads),
        in_specs=[
            whole(1),  # rows
            whole(t),  # slot_mapping
            whole(s, t, heads, h),  # parts, heads split out of the columns
            whole(t, h // 2),  # cos
            whole(t, h // 2),  # sin
            pool_spec,  # k_pages (aliased to output 1)
            pool_spec,  # v_pages (aliased to output 2)
        ],
        out_specs=(whole(t, num_q_heads, h), pool_spec, pool_spec),
        out_shape=(jax.ShapeDtypeStruct((t, num_q_heads, h), dtype),
                   jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)),
        input_output_aliases={5: 1, 6: 2},
        compiler_params=compiler_params(1, 1),
        interpret=interpret,
        name=f"rope_write_kv_n{num_q_heads}_k{k_heads}_s{s}",
    )(rows, slots, parts.reshape(s, t, heads, h), cos, sin, k_pages, v_pages)


def rope_write_kv_reference(parts: jax.Array, cos: jax.Array, sin: jax.Array,
                            slot_mapping: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                            rows: jax.Array | None = None, *, num_q_heads: int,
                            dtype: jnp.dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pure jnp: the sum, the slices, rope in float32 and the scatter, one after the other
    (padding rows: q zero, nothing stored)."""
    check_shapes(parts, cos, sin, slot_mapping, k_pages, v_pages, num_q_heads)
    k_heads, num_pages, page_size, h = k_pages.shape
    t = parts.shape[1]
    y = parts[0]
    for i in range(1, parts.shape[0]):
        y = y + parts[i]
    y = y.astype(dtype).reshape(t, num_q_heads + 2 * k_heads, h)
    q, k, v = (y[:, :num_q_heads], y[:, num_q_heads:num_q_heads + k_heads],
               y[:, num_q_heads + k_heads:])

    def rope(x):
        x32 = x.astype(jnp.float32)
        x1, x2 = x32[..., :h // 2], x32[..., h // 2:]
        c, s = cos[:, None, :], sin[:, None, :]
        return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(dtype)

    q, k = rope(q), rope(k)
    real = jnp.arange(t) < (t if rows is None else rows[0])
    q = jnp.where(real[:, None, None], q, jnp.zeros_like(q))
    # padding rows go to a slot past the pool, which the scatter drops
    slots = jnp.where(real, jnp.clip(slot_mapping, 0, num_pages * page_size - 1),
                      num_pages * page_size)
    flat_k = k_pages.reshape(k_heads, num_pages * page_size, h)
    flat_v = v_pages.reshape(k_heads, num_pages * page_size, h)
    flat_k = flat_k.at[:, slots].set(k.swapaxes(0, 1).astype(k_pages.dtype), mode="drop")
    flat_v = flat_v.at[:, slots].set(v.swapaxes(0, 1).astype(v_pages.dtype), mode="drop")
    return q, flat_k.reshape(k_pages.shape), flat_v.reshape(v_pages.shape)
