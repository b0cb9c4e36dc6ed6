"""q/k/v epilogue and ragged paged attention of a decode-sized step in one launch.

What `rope_write_kv` followed by `ragged_paged_attention` compute, for a step whose q/k/v come
from the skinny GEMM as float32 split-K partials (at most 64 token rows)::

    y      = round(sum over s of parts[s])               (float32, in order; rounded to dtype)
    q      = rope(y[:, q heads]),  k = rope(y[:, k heads]),  v = y[:, v heads]
    k, v   -> stored into their slots of the pages
    o      = ragged paged attention of q over each sequence's cached keys and this step's ones

Why: in a batch-1 decode step of the 8B model the epilogue kernel costs ~2-2.4 us per layer
plus its launch gap (bench/results/session16_h200x2); here its work rides in the attention
programs, whose loads of the partials overlap their walk over the pages.

Layouts (T token rows, S' split-K slices, N q heads, K KV heads, H head dim):
  parts         f32[S', T, (N + 2K) * H]  the partials of [q | k | v] side by side
  cos, sin      f32[T, H / 2]             rope's tables for the tokens' positions
  slot_mapping  i32[T]                    page * L + offset of each token
  rows          i32[1]                    the real token rows (the rows after are padding)
  k/v_pages     [K, P, L, H]              the layer's pools, updated in place (aliased: donate)
  kv_lens, page_table, cu_q_lens, num_seqs  as for `ragged_paged_attention`
  out           [T, N, H]                 attention output (padding rows 0)

Rope is the half-split layout of HF Llama (as `rope_write_kv`): out = [x1 cos - x2 sin,
x2 cos + x1 sin] in float32, rounded to the dtype.

Algorithm: the grid, work list, GQA folding and flash-decoding splits of
`ragged_paged_attention` (ragged_paged_attention.py). What differs:
  - A program reads its q tile from the partials (gathered, summed, rounded, rotated) as two
    [rows, H/2] halves; each logit is q_lo . k_lo + q_hi . k_hi (two dots of depth H/2).
  - The pages hold only the keys before this step: positions < kv_len - q_len (``n_cached``).
    This step's keys of the sequence (at most `new_rows` rows, from the partials) are one more
    KV block that the last split adds after its walk over the pages. Its partials are loaded
    before that walk, so their latency hides behind it.
  - The last split's program also stores the K/V of its own tile's tokens into their slots
    (each real token once, one row per store with scalar indices, as `rope_write_kv`); padding
    rows store nothing. No program reads a slot this step writes, so the order of programs does
    not matter.

Constraints: as `ragged_paged_attention` (H, L, pages_per_block, block_q * G powers of two;
block_q * G >= 16 on the GPU), and the GQA group G a power of two; T <= 64 rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from xlaserve.pallas_kernels.ragged_paged_attention import (
    RaggedPagedAttentionConfig,
    check_inputs,
    combine_splits,
    compiler_params,
    work_list,
)
from xlaserve.pallas_kernels.rope_write_kv import check_shapes, rope_write_kv_reference

_LOG2E = math.log2(math.e)
MAX_ROWS = 64  # token rows of a step this op takes (decode-sized steps)


def _rope_write_attention_kernel(
    meta_ref,  # i32[5, W]: per work item (seq, t0, end token, position of t0, seq's first token)
    page_table_ref,  # i32[S, M'] (M' = M rounded up to a multiple of pages_per_block)
    rows_ref,  # i32[1]: the leading token rows that are real
    slot_ref,  # i32[T]
    parts_ref,  # f32[S' * T, (N + 2K) * H]: the split-K partials, slices stacked on the rows
    cos_ref,  # f32[T, H/2]
    sin_ref,  # f32[T, H/2]
    k_pages_ref,  # [P, L, H]: this KV head's K pool (aliased to k_out_ref)
    v_pages_ref,  # [P, L, H]: this KV head's V pool (aliased to v_out_ref)
    o_ref,  # [T, N, H]; f32 unnormalised partial output if num_splits > 1
    *refs,  # num_splits > 1: m_ref, l_ref f32 [T, N]; then k_out_ref, v_out_ref [P, L, H]
    num_tokens: int,
    num_parts: int,
    num_q_heads: int,
    num_kv_heads: int,
    group: int,
    block_q: int,
    pages_per_block: int,
    num_splits: int,
    new_rows: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
):
    """One program: one q tile (block_q tokens x G heads) of one KV head, one KV split."""
    *stat_refs, k_out_ref, v_out_ref = refs
    w, kh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    page_size, head_dim = k_pages_ref.shape[1], k_pages_ref.shape[2]
    half = head_dim // 2
    dtype = k_pages_ref.dtype
    block_k = pages_per_block * page_size
    rows = block_q * group
    seq, t0, t_end = meta_ref[0, w], meta_ref[1, w], meta_ref[2, w]
    pos0, q_start = meta_ref[3, w], meta_ref[4, w]
    n_real = rows_ref[0]
    last = num_tokens - 1

    def iota(shape, dim=0):  # shape: an int (1-D) or a tuple
        return lax.broadcasted_iota(jnp.int32, (shape,) if isinstance(shape, int) else shape,
                                    dim)

    def summed(row_idx, col_idx):  # sum over the slices of parts[:, row, col], rounded
        acc = parts_ref[row_idx, col_idx]
        for s in range(1, num_parts):
            acc = acc + parts_ref[row_idx + s * num_tokens, col_idx]
        return acc.astype(dtype).astype(jnp.float32)

    def rotated(row_idx, lo_col, d_idx):  # rope of the head half at lo_col (and lo_col + H/2)
        x1, x2 = summed(row_idx, lo_col), summed(row_idx, lo_col + half)
        cos, sin = cos_ref[row_idx, d_idx], sin_ref[row_idx, d_idx]
        return (x1 * cos - x2 * sin).astype(dtype), (x2 * cos + x1 * sin).astype(dtype)

    # q tile [rows, H/2] x 2 (rows token major, the G heads of KV head kh minor)
    col = iota((1, group * half), 1)
    q_tok = jnp.clip(t0 + iota((block_q, 1)), 0, last)  # [bq, 1]
    q_lo_col = (kh * group + col // half) * head_dim + col % half  # [1, G * H/2]
    q_lo, q_hi = (x.reshape(rows, half) for x in rotated(q_tok, q_lo_col, col % half))

    # this step's keys and values of the sequence, from the partials: [new_rows, H/2] x 2, [., H]
    i = iota(new_rows)
    n_tok = jnp.clip(q_start + i, 0, last)[:, None]  # [new_rows, 1]
    d = iota((1, half), 1)
    kn_lo, kn_hi = rotated(n_tok, (num_q_heads + kh) * head_dim + d, d)
    vn = summed(n_tok, (num_q_heads + num_kv_heads + kh) * head_dim
                + iota((1, head_dim), 1)).astype(dtype)

    tok = iota(rows) // group  # [rows] token within tile
    q_pos = pos0 + tok  # [rows]
    tile_valid = t0 + iota((block_q, 1, 1)) < t_end  # [bq, 1, 1]
    n_cached = pos0 - (t0 - q_start)  # keys in the pages: positions < n_cached
    kv_start = 0 if sliding_window is None else jnp.maximum(pos0 - sliding_window + 1, 0)
    j_lo = kv_start // block_k
    j_hi = jnp.maximum((n_cached + block_k - 1) // block_k, j_lo)
    if num_splits > 1:
        per_split = (j_hi - j_lo + num_splits - 1) // num_splits
        j_lo = jnp.minimum(j_lo + split * per_split, j_hi)
        j_hi = jnp.minimum(j_lo + per_split, j_hi)
    # Blocks whose keys are all cached need no mask (every row sees every cached key).
    j_mid = jnp.clip(n_cached // block_k, j_lo, j_hi)
    if sliding_window is not None:
        j_mid = j_lo  # the window mask depends on the row: mask every block
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    logit_scale = sm_scale if soft_cap is not None else sm_scale * _LOG2E

    def dot_t(a, b):  # a [r, x] . b [c, x]^T -> [r, c] f32
        return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)

    def update(carry, s, v, mask):  # online softmax over one KV block's logits s [rows, bk]
        o, m, l = carry
        s = s * logit_scale
        if soft_cap is not None:
            s = (soft_cap * _LOG2E) * jnp.tanh(s / soft_cap)
        if mask is not None:
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with no key yet
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        return alpha[:, None] * o + pv, m_new, l

    def body(j, carry, *, masked: bool):
        key = iota(block_k)
        page_ids = page_table_ref[seq, j * pages_per_block + key // page_size][:, None]
        offs = (key % page_size)[:, None]
        k_lo = k_pages_ref[page_ids, offs, d]  # [block_k, H/2]
        k_hi = k_pages_ref[page_ids, offs, d + half]
        v = v_pages_ref[page_ids, offs, iota((1, head_dim), 1)]  # [block_k, H]
        s = dot_t(q_lo, k_lo) + dot_t(q_hi, k_hi)
        mask = None
        if masked:
            k_pos = j * block_k + iota((1, block_k), 1)
            mask = k_pos < n_cached
            if sliding_window is not None:
                mask = mask & (k_pos > q_pos[:, None] - sliding_window)
        return update(carry, s, v, mask)

    carry = (jnp.zeros((rows, head_dim), jnp.float32),
             jnp.full((rows,), -jnp.inf, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    carry = lax.fori_loop(j_lo, j_mid, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(j_mid, j_hi, functools.partial(body, masked=True), carry)

    # The new keys (the last split's): real rows of this sequence, causal, in the window. The
    # other rows were gathered from other sequences or padding (maybe not finite): zero their
    # values, since a masked key still multiplies its value by p = 0.
    is_last = split == num_splits - 1
    n_valid = (i < t_end - q_start) & (q_start + i < n_real) & is_last  # [new_rows]
    vn = jnp.where(n_valid[:, None], vn, jnp.zeros_like(vn))
    n_pos = n_cached + iota((1, new_rows), 1)
    mask = n_valid[None, :] & (n_pos <= q_pos[:, None])
    if sliding_window is not None:
        mask = mask & (n_pos > q_pos[:, None] - sliding_window)
    o, m, l = update(carry, dot_t(q_lo, kn_lo) + dot_t(q_hi, kn_hi), vn, mask)

    # K/V of this tile's real tokens into their slots (the last split's program), one token
    # row at a time with scalar indices: row r of the new block, picked by a one-hot sum (exact)
    for j in range(block_q):
        t = t0 + j

        @pl.when((t < t_end) & (t < n_real) & is_last)
        def _(t=t):
            pick = (i == t - q_start)[:, None]

            def row(x):  # [new_rows, W] -> [W]: the row of token t
                return jnp.sum(jnp.where(pick, x.astype(jnp.float32), 0.0), axis=0)

            slot = slot_ref[t]
            page, off = slot // page_size, slot % page_size
            k_out_ref[page, off, pl.ds(0, half)] = row(kn_lo).astype(k_out_ref.dtype)
            k_out_ref[page, off, pl.ds(half, half)] = row(kn_hi).astype(k_out_ref.dtype)
            v_out_ref[page, off, :] = row(vn).astype(v_out_ref.dtype)

    out = (pl.ds(t0, block_q), pl.ds(kh * group, group))

    def store(ref, value):  # value [rows, H] or [rows]
        if value.ndim == 1:
            plgpu.store(ref.at[out], value.reshape(block_q, group), mask=tile_valid[:, :, 0])
        else:
            plgpu.store(ref.at[(*out, slice(None))], value.reshape(block_q, group, head_dim),
                        mask=tile_valid)

    if num_splits == 1:
        o = o / jnp.where(l == 0.0, 1.0, l)[:, None]  # rows without keys (padding) give 0
        store(o_ref, o.astype(o_ref.dtype))
    else:
        m_ref, l_ref = stat_refs
        store(o_ref, o)
        store(m_ref, m)
        store(l_ref, l)


def _check(parts, cos, sin, slot_mapping, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
           num_seqs, num_q_heads):
    check_shapes(parts, cos, sin, slot_mapping, k_pages, v_pages, num_q_heads)
    t, h = slot_mapping.shape[0], k_pages.shape[-1]
    q_shape = jax.ShapeDtypeStruct((t, num_q_heads, h), k_pages.dtype)
    check_inputs(q_shape, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    if t > MAX_ROWS:
        raise ValueError(f"rope_write_attention: {t} token rows > {MAX_ROWS} (decode-sized "
                         f"steps only)")


@functools.partial(jax.jit, static_argnames=("num_q_heads", "dtype", "sm_scale",
                                             "sliding_window", "soft_cap", "config",
                                             "interpret"))
def rope_write_attention(
    parts: jax.Array,  # f32[S', T, (N + 2K) * H]
    cos: jax.Array,  # f32[T, H/2]
    sin: jax.Array,  # f32[T, H/2]
    slot_mapping: jax.Array,  # i32[T]
    rows: jax.Array,  # i32[1]
    k_pages: jax.Array,  # [K, P, L, H]
    v_pages: jax.Array,  # [K, P, L, H]
    kv_lens: jax.Array,  # i32[S]
    page_table: jax.Array,  # i32[S, M]
    cu_q_lens: jax.Array,  # i32[S+1]
    num_seqs: jax.Array,  # i32[1]
    *,
    num_q_heads: int,
    dtype: jnp.dtype,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    config: RaggedPagedAttentionConfig | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(o [T, N, H], k_pages, v_pages with this step's K/V stored): see the module docstring.
    The pools are aliased to the outputs (donate them, or XLA copies the pools).

    Raises:
      ValueError: shapes or dtypes that do not fit (named), a GQA group that is not a power of
        two, more than MAX_ROWS rows, or tiles with fewer than 16 rows on the GPU.
    """
    _check(parts, cos, sin, slot_mapping, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
           num_seqs, num_q_heads)
    n_parts, t, width = parts.shape
    k_heads, num_pages, page_size, h = k_pages.shape
    s_max, m_pages = page_table.shape
    g = num_q_heads // k_heads
    if g & (g - 1):
        raise ValueError(f"rope_write_attention: GQA group {g} (q heads {num_q_heads} / KV "
                         f"heads {k_heads}) must be a power of two")
    if config is None:
        from xlaserve.pallas_kernels.tuning import lookup_config

        config = lookup_config(head_dim=h, page_size=page_size, group=g, num_tokens=t,
                               num_seqs=s_max, max_kv_len=m_pages * page_size,
                               num_kv_heads=k_heads, itemsize=jnp.dtype(dtype).itemsize)
    bq, ppb, splits = config.block_q, config.pages_per_block, config.num_splits
    if not interpret and bq * g < 16:
        raise ValueError(f"rope_write_attention: block_q * G = {bq} * {g} < 16 rows: Triton "
                         f"dots need 16; {config}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    new_rows = max(16, 1 << (t - 1).bit_length())
    meta = work_list(kv_lens, cu_q_lens, num_seqs, num_tokens=t, block_q=bq)  # [5, W]
    num_items = meta.shape[1]
    table = page_table
    if m_pages % ppb:
        table = jnp.pad(page_table, ((0, 0), (0, ppb - m_pages % ppb)))
    slots = jnp.clip(slot_mapping, 0, num_pages * page_size - 1)

    kernel = functools.partial(
        _rope_write_attention_kernel, num_tokens=t, num_parts=n_parts,
        num_q_heads=num_q_heads, num_kv_heads=k_heads, group=g, block_q=bq,
        pages_per_block=ppb, num_splits=splits, new_rows=new_rows, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap)
    whole = lambda *shape: pl.BlockSpec(shape, lambda w, kh, sp: (0,) * len(shape))  # noqa: E731
    pool_spec = pl.BlockSpec((None, num_pages, page_size, h), lambda w, kh, sp: (kh, 0, 0, 0))
    in_specs = [whole(5, num_items), whole(*table.shape), whole(1), whole(t),
                whole(n_parts * t, width), whole(t, h // 2), whole(t, h // 2),
                pool_spec, pool_spec]
    o_dims = (t, num_q_heads)
    if splits == 1:
        o_shapes = [jax.ShapeDtypeStruct((*o_dims, h), dtype)]
        o_specs = [whole(*o_dims, h)]
    else:
        o_shapes = [jax.ShapeDtypeStruct((splits, *o_dims, h), jnp.float32),
                    jax.ShapeDtypeStruct((splits, *o_dims), jnp.float32),
                    jax.ShapeDtypeStruct((splits, *o_dims), jnp.float32)]
        o_specs = [pl.BlockSpec((None, *o_dims, h), lambda w, kh, sp: (sp, 0, 0, 0)),
                   pl.BlockSpec((None, *o_dims), lambda w, kh, sp: (sp, 0, 0)),
                   pl.BlockSpec((None, *o_dims), lambda w, kh, sp: (sp, 0, 0))]
    n_out = len(o_shapes)
    out = pl.pallas_call(
        kernel,
        grid=(num_items, k_heads, splits),
        in_specs=in_specs,
        out_specs=(*o_specs, pool_spec, pool_spec),
        out_shape=(*o_shapes, jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)),
        input_output_aliases={7: n_out, 8: n_out + 1},
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=f"rope_write_attention_bq{bq}_ppb{ppb}_sp{splits}",
    )(meta, table, rows, slots, parts.reshape(n_parts * t, width), cos, sin, k_pages, v_pages)
    o = out[0] if splits == 1 else combine_splits(*out[:3], dtype)
    return o, out[n_out], out[n_out + 1]


def rope_write_attention_reference(
    parts: jax.Array, cos: jax.Array, sin: jax.Array, slot_mapping: jax.Array, rows: jax.Array,
    k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array, page_table: jax.Array,
    cu_q_lens: jax.Array, num_seqs: jax.Array, *, num_q_heads: int, dtype: jnp.dtype,
    sm_scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pure jnp: `rope_write_kv_reference`, then `ragged_paged_attention_reference`."""
    from xlaserve.pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference

    _check(parts, cos, sin, slot_mapping, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
           num_seqs, num_q_heads)
    q, k_pages, v_pages = rope_write_kv_reference(parts, cos, sin, slot_mapping, k_pages,
                                                  v_pages, rows, num_q_heads=num_q_heads,
                                                  dtype=dtype)
    o = ragged_paged_attention_reference(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens,
                                         num_seqs, sm_scale=sm_scale,
                                         sliding_window=sliding_window, soft_cap=soft_cap)
    return o, k_pages, v_pages
