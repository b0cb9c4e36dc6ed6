"""Flash-decoding's combine: the KV splits' partial attention outputs merged in one kernel.

When `ragged_paged_attention` splits each tile's KV range over S programs, every split leaves
an unnormalised output, its rows' logit maxima and its softmax sums. This computes, for each
row x::

    m*     = max over s of m[s, x]             (0 where every split is -inf: no keys at all)
    w[s]   = exp2(m[s, x] - m*)                (0 for a split without keys)
    out[x] = (sum over s of w[s] o[s, x]) / (sum over s of w[s] l[s, x])   (a zero sum: 1)

rounded to `dtype`, as `combine_splits_reference` (the jnp form XLA fuses) does.

Why: XLA makes two fusions of the jnp form. In the 8B model's batch-1 decode step, with 12
splits at tp=2 (pallas_kernels/tuning_h100.json, small_decode), they took 1.4 + 1.85 us per
layer. They are also two kernel boundaries, and the kernel after them waits idle for ~0.3 us,
because XLA's loop fusions do not let their dependents launch early
(bench/results/session23_h200x2/README.md). One Pallas launch is one boundary. It can trigger
its dependents' launch early (pallas_kernels/pdl.py, family "combine_splits").
Measured in that step on 2 x H200 (session 24, bench/results/session24_h200x2/README.md): it
lost. The kernel took 4.7 us per layer against 3.0 for XLA's two fusions (its 16 programs each
walk 12 splits of 16 rows, mostly padding), and the step's steady state was 40-60 us slower at
tp=2 (2.784-2.786 ms against 2.727-2.742; 2.810 with its trigger on) and 50-70 us at tp=1.
`RaggedPagedAttentionConfig.combine` selects it; "xla" stays the default. Also tried (session
25, commit 972555e, removed): the jnp form unrolled over the splits (elementwise ops on static
slices). XLA still made two fusions (the splits' maximum 1.16 us, the merge 2.3 us) and the
step did not change. And (commit f4ee8fb, removed): the merge inside the attention kernel by
each tile's last split (an atomic counter per tile): the kernel took 11.9 us per layer against
7.2 + 3.1, +149-175 us per tp=2 step.

Layouts:
  o     f32[S, X, H]  the splits' unnormalised outputs (X rows: tokens x q heads, any order)
  m, l  f32[S, X]     each split's row maxima (log2 units; -inf without keys) and sums
  out   [X, H]        in `dtype`

Algorithm: grid (X / block_rows,). A program loads its rows' S maxima (one [block_rows] load
each), then walks the splits again, adding w[s] * o[s] ([block_rows, H] tiles) and w[s] * l[s].
S is static and the loop unrolled.

Constraints: H a power of two; block_rows a power of two dividing X (the wrapper picks the
largest up to 16).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jax import lax

from xlaserve.pallas_kernels import pdl
from xlaserve.pallas_kernels.ragged_paged_attention import compiler_params

MAX_BLOCK_ROWS = 16


def _combine_splits_kernel(
    o_ref,  # f32[S, block_rows, H]
    m_ref,  # f32[S, block_rows]
    l_ref,  # f32[S, block_rows]
    out_ref,  # [block_rows, H]
    *,
    num_splits: int,
    early_launch: bool,
):
    if early_launch:
        pdl.launch_dependents()
    m_max = m_ref[0]
    for s in range(1, num_splits):
        m_max = jnp.maximum(m_max, m_ref[s])
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)  # [block_rows]
    l_sum = jnp.zeros_like(m_max)
    acc = jnp.zeros(out_ref.shape, jnp.float32)  # [block_rows, H]
    for s in range(num_splits):
        w = jnp.exp2(m_ref[s] - m_max)  # [block_rows]
        l_sum = l_sum + w * l_ref[s]
        acc = acc + w[:, None] * o_ref[s]
    out_ref[...] = (acc / jnp.where(l_sum == 0, 1.0, l_sum)[:, None]).astype(out_ref.dtype)


def block_rows_for(x: int) -> int:
    """The largest power of two <= MAX_BLOCK_ROWS dividing x."""
    b = MAX_BLOCK_ROWS
    while b > 1 and x % b:
        b //= 2
    return b


@functools.partial(jax.jit, static_argnames=("dtype", "interpret"))
def combine_splits(o: jax.Array, m: jax.Array, l: jax.Array, *, dtype: jnp.dtype,  # noqa: E741
                   interpret: bool = False) -> jax.Array:
    """[X, H] in `dtype`: the splits of o f32[S, X, H] merged by their m, l f32[S, X].

    Raises:
      ValueError: shapes or dtypes that do not fit (named).
    """
    if o.ndim != 3 or m.shape != o.shape[:2] or l.shape != o.shape[:2] \
            or {o.dtype, m.dtype, l.dtype} != {jnp.dtype(jnp.float32)}:
        raise ValueError(f"combine_splits: o f32[S, X, H], m and l f32[S, X]; got o {o.shape} "
                         f"{o.dtype}, m {m.shape} {m.dtype}, l {l.shape} {l.dtype}")
    s, x, h = o.shape
    if h & (h - 1):
        raise ValueError(f"combine_splits: head dim H={h} must be a power of two; o {o.shape}")
    br = block_rows_for(x)
    kernel = functools.partial(_combine_splits_kernel, num_splits=s,
                               early_launch=pdl.enabled(interpret, "combine_splits"))
    return pl.pallas_call(
        kernel,
        grid=(x // br,),
        in_specs=[pl.BlockSpec((s, br, h), lambda i: (0, i, 0)),  # o: these rows, every split
                  pl.BlockSpec((s, br), lambda i: (0, i)),  # m
                  pl.BlockSpec((s, br), lambda i: (0, i))],  # l
        out_specs=pl.BlockSpec((br, h), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((x, h), dtype),
        compiler_params=compiler_params(4, 1),
        interpret=interpret,
        name=f"combine_splits_s{s}",
    )(o, m, l)


def combine_splits_reference(o: jax.Array, m: jax.Array, l: jax.Array,  # noqa: E741
                             dtype: jnp.dtype) -> jax.Array:
    """Pure jnp (any leading S, then any row shape, then H for o): the form XLA fuses."""
    m_max = jnp.max(m, axis=0)
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    weight = jnp.exp2(m - m_max[None])  # [S, ...]; 0 for splits without keys
    l_sum = jnp.sum(weight * l, axis=0)
    out = jnp.sum(weight[..., None] * o, axis=0)
    return (out / jnp.where(l_sum == 0, 1.0, l_sum)[..., None]).astype(dtype)


def combine_splits_reduce(o: jax.Array, m: jax.Array, l: jax.Array,  # noqa: E741
                          dtype: jnp.dtype) -> jax.Array:
    """The same merge as one variadic reduce over the splits (what `combine="reduce"` runs).

    `combine_splits_reference` needs the splits' maximum before it can weight them, and XLA
    makes that maximum a fusion of its own. Here the reducer carries (max, sum, output) and
    rescales both sides to their joint maximum at every step (the online softmax's merge), so
    no separate maximum exists and XLA can emit the whole merge, division included, as one
    reduction fusion. Results differ from the reference only by float32 rounding (the order in
    which the weights are applied).
    """
    mb = jnp.broadcast_to(m[..., None], o.shape)
    lb = jnp.broadcast_to(l[..., None], o.shape)

    def merge(a, b):
        (m1, l1, o1), (m2, l2, o2) = a, b
        m12 = jnp.maximum(m1, m2)
        m_safe = jnp.where(m12 == -jnp.inf, 0.0, m12)  # both without keys: weights 0
        w1, w2 = jnp.exp2(m1 - m_safe), jnp.exp2(m2 - m_safe)
        return m12, l1 * w1 + l2 * w2, o1 * w1 + o2 * w2

    init = (jnp.float32(-jnp.inf), jnp.float32(0), jnp.float32(0))
    _, l_sum, out = lax.reduce((mb, lb, o), init, merge, (0,))
    return (out / jnp.where(l_sum == 0, 1.0, l_sum)).astype(dtype)
