"""Ragged paged attention: decode rows and prefill chunks of many sequences in one call.

Computes, for every query row t of sequence s (rows ``cu_q_lens[s]:cu_q_lens[s+1]``), causal
attention over that sequence's K/V, which live in fixed-size pages of a shared pool.

Layouts:
  q          [T, N, H]     all scheduled tokens of all sequences, flattened
  k_pages    [K, P, L, H]  K pool: KV head, page, slot in page, head dim (page 0 = padding page)
  v_pages    [K, P, L, H]  V pool, same layout
  kv_lens    i32[S]        tokens in the cache for each sequence, this step's tokens included
  page_table i32[S, M]     page ids of each sequence, in order (M = max pages per sequence)
  cu_q_lens  i32[S+1]      prefix sums of the q length of each sequence
  num_seqs   i32[1]        real sequences; rows past cu_q_lens[num_seqs] are padding (output 0)

Query row i of sequence s sits at position ``kv_lens[s] - q_len[s] + i`` and attends to keys at
positions ``<=`` its own (and ``> pos - sliding_window`` when a window is set). GQA: q head n uses
KV head ``n // (N // K)``. Optional logit soft cap: ``s = soft_cap * tanh(s / soft_cap)``.

Implementations in this file:
  * `ragged_paged_attention`: the portable Pallas kernel (Triton lowering on NVIDIA GPUs,
    ``interpret=True`` on CPU). Algorithm: FlashAttention-2 online softmax over blocks of
    ``pages_per_block`` pages, gathered straight from the pools through the page table.
    - A 1-D work list of (sequence, first q token) tiles is built in jnp inside the jitted wrapper,
      bounded statically by ``cdiv(T, block_q) + min(S, T) + 1``, so ragged q lengths cost no
      empty programs beyond that bound. The padding rows past cu_q_lens[num_seqs] form one
      pseudo-sequence without keys whose tiles store zeros: every output row is written once,
      and no XLA pass over q or o is needed before or after the kernel.
    - GQA: the G q heads of one KV head are folded into the tile rows (rows = block_q * G,
      token major; q is read as [block_q, G, H] straight from [T, N, H]), so a decode row
      (q_len 1) still gives G rows per dot and each K/V page is read once per KV head, not
      once per q head. Rows of other sequences inside a tile are masked on load and store.
    - K/V gather: one page id per key (``key_gather``, [block_k, H] pointers) or one per page
      ([pages_per_block, L, H] pointers, then a reshape).
    - Long contexts with few tiles: the KV range is split over ``num_splits`` programs
      (flash-decoding); each writes an unnormalised partial output with its row max and sum, and
      `combine_splits` (jnp, which XLA fuses) merges them.
    - The causal mask is applied only on KV blocks that reach past the tile's first position.
  * `write_kv_pages`: a Pallas kernel writing this step's K/V rows into their slots in place
    (``input_output_aliases``; donate the pools so XLA does not copy them).
  * `*_reference`: pure jnp, the ground truth.

Constraints of the kernel: H, L, pages_per_block and block_q * G' are powers of two (G' = G
rounded up to a power of two: extra q heads are zero padding); block_q * G' >= 16 on the GPU
(Triton dots need 16 rows). Page-table entries past a sequence's last page may be read (whole
KV blocks) but their keys are masked; every entry must be a page id in [0, P) (0 by the batch
contract): the kernel does not bound-check them.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from xlaserve.pallas_kernels import pdl

_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class RaggedPagedAttentionConfig:
    """Tile sizes and launch parameters of the Pallas kernel (see tuning.py for the table).

    Attributes:
      block_q: q tokens per tile; the tile has block_q * G' rows (G' = padded GQA group).
      pages_per_block: pages per KV step; block_k = pages_per_block * page_size keys.
      num_splits: programs sharing one tile's KV range (flash-decoding); 1 = no split.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the KV loop.
      key_gather: gather K/V with one page id per key ([block_k, H] pointers straight away)
        instead of one per page ([pages_per_block, L, H] pointers, then a reshape).
      q_transposed: the wrapper lays q out as [K, (T + block_q) G', H] (one XLA pass before and
        one after) so a tile is plain 2-D rows; otherwise the kernel reads [block_q, G', H]
        straight from [T, N, H] and reshapes. Measured: direct wins for decode, transposed for
        prefill (bench/NOTES_attention.md).
    """

    block_q: int = 16
    pages_per_block: int = 4
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    key_gather: bool = False
    q_transposed: bool = False

    def __post_init__(self) -> None:
        for name in ("block_q", "pages_per_block", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a positive power of two, got {value}")
        if self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {self.num_splits}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


def check_inputs(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, kv_lens: jax.Array,
                 page_table: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array) -> None:
    """Raises ValueError naming the input whose shape or dtype does not fit the op."""
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H], got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [K, P, L, H], got {k_pages.shape} "
                         f"and {v_pages.shape}")
    _, n, h = q.shape
    k, _, _, hk = k_pages.shape
    if hk != h:
        raise ValueError(f"head dim of q ({h}) != head dim of k_pages ({hk}); q {q.shape}, "
                         f"k_pages {k_pages.shape}")
    if n % k:
        raise ValueError(f"q heads ({n}) must be a multiple of KV heads ({k})")
    if page_table.ndim != 2 or kv_lens.shape != (page_table.shape[0],):
        raise ValueError(f"kv_lens must be [S] and page_table [S, M], got {kv_lens.shape} and "
                         f"{page_table.shape}")
    if cu_q_lens.shape != (page_table.shape[0] + 1,):
        raise ValueError(f"cu_q_lens must be [S+1] = [{page_table.shape[0] + 1}], got "
                         f"{cu_q_lens.shape}")
    if num_seqs.size != 1:
        raise ValueError(f"num_seqs must hold one value, got shape {num_seqs.shape}")
    for name, a in (("kv_lens", kv_lens), ("page_table", page_table), ("cu_q_lens", cu_q_lens),
                    ("num_seqs", num_seqs)):
        if a.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {a.dtype}")


def compiler_params(num_warps: int, num_stages: int):
    """Triton compiler params; the class name differs between jax releases, so look it up.
    (Shared by the Pallas Triton kernels of this package.)"""
    cls = getattr(plgpu, "CompilerParams", None)
    if cls is None:  # older jax: the earlier name, absent from the jax pyright checks against
        cls = plgpu.TritonCompilerParams  # pyright: ignore[reportAttributeAccessIssue]
    return cls(num_warps=num_warps, num_stages=num_stages)


def padded_group(group: int) -> int:
    """The GQA group as the kernel runs it: the next power of two (zero q heads pad G 7 to 8)."""
    return 1 << max(0, (group - 1).bit_length())


def _ragged_paged_attention_kernel(
    meta_ref,  # i32[4, W]: per work item (seq, first token t0, end token, position of t0)
    page_table_ref,  # i32[S, M'] (M' = M rounded up to a multiple of pages_per_block)
    q_ref,  # [T, N', H] all q rows (N' = K G'), or [(T + bq) G', H] head kh's if q_transposed
    k_pages_ref,  # [P, L, H]: this KV head's K pool
    v_pages_ref,  # [P, L, H]: this KV head's V pool
    o_ref,  # like q_ref; f32 unnormalised partial output if num_splits > 1
    *stat_refs,  # num_splits > 1 only: m_ref, l_ref f32 like q_ref without H (m in log2 units)
    group: int,
    block_q: int,
    pages_per_block: int,
    num_splits: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    key_gather: bool,
    q_transposed: bool,
    early_launch: bool,
):
    """One program: one q tile (block_q tokens x G' heads) of one KV head, one KV split."""
    if early_launch:
        pdl.launch_dependents()
    w, kh, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    page_size, head_dim = k_pages_ref.shape[1], k_pages_ref.shape[2]
    block_k = pages_per_block * page_size
    rows = block_q * group
    seq, t0, t_end, pos0 = meta_ref[0, w], meta_ref[1, w], meta_ref[2, w], meta_ref[3, w]

    tok = lax.broadcasted_iota(jnp.int32, (rows,), 0) // group  # [rows] token within tile
    q_pos = pos0 + tok  # [rows]
    tile_valid = t0 + lax.broadcasted_iota(jnp.int32, (block_q, 1, 1), 0) < t_end  # [bq, 1, 1]
    kv_stop = jnp.maximum(pos0 + jnp.clip(t_end - t0, 0, block_q), 0)  # keys < kv_stop needed
    kv_start = 0 if sliding_window is None else jnp.maximum(pos0 - sliding_window + 1, 0)
    j_lo = kv_start // block_k
    j_hi = jnp.maximum((kv_stop + block_k - 1) // block_k, j_lo)
    if num_splits > 1:
        per_split = (j_hi - j_lo + num_splits - 1) // num_splits
        j_lo = jnp.minimum(j_lo + split * per_split, j_hi)
        j_hi = jnp.minimum(j_lo + per_split, j_hi)
    # Blocks whose last key is <= pos0 need no causal mask (every row sees all of them).
    j_mid = jnp.clip((pos0 + 1) // block_k, j_lo, j_hi)
    if sliding_window is not None:
        j_mid = j_lo  # the window mask depends on the row: mask every block

    row_valid = t0 + tok < t_end  # [rows]
    if q_transposed:
        # The wrapper pads q by block_q tokens, so this plain (unmasked) load stays in bounds;
        # measured: the masked form of this load made prefill ~25% slower (NOTES_attention.md).
        out = (pl.ds(t0 * group, rows),)
        q = q_ref[pl.ds(t0 * group, rows), :]  # [rows, H]
    else:
        out = (pl.ds(t0, block_q), pl.ds(kh * group, group))
        q = plgpu.load(q_ref.at[(*out, slice(None))], mask=tile_valid,
                       other=0).reshape(rows, head_dim)  # [rows, H]
    # float32 inputs: full-precision dots (the Triton default for f32 may be tf32).
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    # Fold sm_scale (and log2 e, for exp2) into the logits once.
    logit_scale = sm_scale if soft_cap is not None else sm_scale * _LOG2E

    def body(j, carry, *, masked: bool):
        o, m, l = carry  # [rows, H] f32, [rows] f32, [rows] f32
        if key_gather:
            key = lax.broadcasted_iota(jnp.int32, (block_k,), 0)  # [block_k]
            # Plain loads of the ids (no mask, no clamp): the loop's software pipeliner then
            # prefetches the ids and the pages they point to (a masked, clamped id load measured
            # ~20% slower on prefill).
            page_ids = page_table_ref[seq, j * pages_per_block + key // page_size]  # [block_k]
            k = k_pages_ref[page_ids, key % page_size, :]  # [block_k, H]
            v = v_pages_ref[page_ids, key % page_size, :]  # [block_k, H]
        else:
            page_ids = page_table_ref[seq, pl.ds(j * pages_per_block, pages_per_block)]  # [ppb]
            k = k_pages_ref[page_ids].reshape(block_k, head_dim)  # [block_k, H]
            v = v_pages_ref[page_ids].reshape(block_k, head_dim)  # [block_k, H]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32) * logit_scale  # [rows, block_k]
        if soft_cap is not None:
            s = (soft_cap * _LOG2E) * jnp.tanh(s / soft_cap)
        if masked:
            k_pos = j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
            mask = k_pos <= q_pos[:, None]
            if sliding_window is not None:
                mask = mask & (k_pos > q_pos[:, None] - sliding_window)
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with no key yet
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)
        return alpha[:, None] * o + pv, m_new, l

    carry = (jnp.zeros((rows, head_dim), jnp.float32),
             jnp.full((rows,), -jnp.inf, jnp.float32),
             jnp.zeros((rows,), jnp.float32))
    carry = lax.fori_loop(j_lo, j_mid, functools.partial(body, masked=False), carry)
    o, m, l = lax.fori_loop(j_mid, j_hi, functools.partial(body, masked=True), carry)

    def store(ref, value, mask_2d):  # value [rows, H] or [rows]; mask_2d [rows, 1] or [rows]
        if q_transposed:
            index = out if value.ndim == 1 else (*out, slice(None))
            plgpu.store(ref.at[index], value, mask=mask_2d)
        elif value.ndim == 1:
            plgpu.store(ref.at[out], value.reshape(block_q, group), mask=tile_valid[:, :, 0])
        else:
            plgpu.store(ref.at[(*out, slice(None))], value.reshape(block_q, group, head_dim),
                        mask=tile_valid)

    if num_splits == 1:
        o = o / jnp.where(l == 0.0, 1.0, l)[:, None]  # rows without keys (padding) give 0
        store(o_ref, o.astype(o_ref.dtype), row_valid[:, None])
    else:
        m_ref, l_ref = stat_refs
        store(o_ref, o, row_valid[:, None])
        store(m_ref, m, row_valid)
        store(l_ref, l, row_valid)


def _work_list(kv_lens: jax.Array, cu_q_lens: jax.Array, num_seqs: jax.Array, *,
               num_tokens: int, block_q: int) -> jax.Array:
    """i32[4, W]: (seq, t0, end token, position of t0) per q tile.

    The padding rows [cu_q_lens[num_seqs], T) form one more pseudo-sequence with no keys, so
    their tiles store zeros (every output row is written by exactly one tile). Unused items
    have t0 == end (nothing stored, no KV block). W = cdiv(T, block_q) + min(S, T) + 1 bounds
    the tiles statically.
    """
    s_max = kv_lens.shape[0]
    num_items = -(-num_tokens // block_q) + min(s_max, num_tokens) + 1
    ns = num_seqs.reshape(())
    seq_ids = jnp.arange(s_max + 1, dtype=jnp.int32)
    # Sequence s_max (pseudo) covers the padding rows.
    starts = jnp.concatenate([cu_q_lens[:-1], cu_q_lens[ns][None]])  # [S+1]
    ends = jnp.concatenate([cu_q_lens[1:], jnp.full((1,), num_tokens, jnp.int32)])
    real = (seq_ids < ns) | (seq_ids == s_max)
    q_lens = jnp.where(real, jnp.maximum(ends - starts, 0), 0)  # [S+1]
    blocks = (q_lens + block_q - 1) // block_q  # [S+1]
    cum = jnp.cumsum(blocks)  # [S+1]
    items = jnp.arange(num_items, dtype=jnp.int32)  # [W]
    seq = jnp.searchsorted(cum, items, side="right", method="compare_all").astype(jnp.int32)
    seq = jnp.minimum(seq, s_max)
    valid = items < cum[-1]
    q_start = starts[seq]
    t0 = q_start + (items - (cum[seq] - blocks[seq])) * block_q
    t_end = q_start + q_lens[seq]
    kv = jnp.concatenate([kv_lens, jnp.full((1,), -(1 << 30), jnp.int32)])  # pseudo: no keys
    pos0 = kv[seq] - q_lens[seq] + (t0 - q_start)
    seq = jnp.minimum(seq, s_max - 1)  # the pseudo-sequence reads no page-table row
    meta = jnp.stack([seq, t0, t_end, pos0])  # [4, W]
    return jnp.where(valid[None, :], meta, 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "config",
                                             "interpret"))
def ragged_paged_attention(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [K, P, L, H]
    v_pages: jax.Array,  # [K, P, L, H]
    kv_lens: jax.Array,  # i32[S]
    page_table: jax.Array,  # i32[S, M]
    cu_q_lens: jax.Array,  # i32[S+1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    config: RaggedPagedAttentionConfig | None = None,
    interpret: bool = False,
) -> jax.Array:  # [T, N, H]
    """Ragged paged attention with the Pallas kernel. Same semantics as the reference.

    Args:
      q: [T, N, H] queries of all sequences, flattened. k_pages, v_pages: [K, P, L, H] pools.
      kv_lens: i32[S]. page_table: i32[S, M]: every entry a page id in [0, P) (entries past a
        sequence's pages are 0 by the batch contract). The kernel reads them unchecked.
      cu_q_lens: i32[S+1]. num_seqs: i32[1].
      sm_scale: logit scale. sliding_window: keys with pos > q_pos - window only. soft_cap:
        logit soft cap. config: tiles; None takes the tuning table's entry for these shapes.
      interpret: run the kernel in the Pallas interpreter (CPU tests).
    Returns:
      [T, N, H] in q's dtype; rows past cu_q_lens[num_seqs] are 0.
    """
    check_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    t_total, n, h = q.shape
    k_heads, num_pages, page_size, _ = k_pages.shape
    s_max, m_pages = page_table.shape
    g = n // k_heads
    gp = padded_group(g)
    if config is None:
        from xlaserve.pallas_kernels.tuning import lookup_config

        config = lookup_config(head_dim=h, page_size=page_size, group=g, num_tokens=t_total,
                               num_seqs=s_max, max_kv_len=m_pages * page_size,
                               num_kv_heads=k_heads, itemsize=q.dtype.itemsize)
    bq, ppb = config.block_q, config.pages_per_block
    rows = bq * gp
    for name, value in (("head dim H", h), ("page size L", page_size)):
        if value & (value - 1):
            raise ValueError(f"{name} must be a power of two for the Pallas kernel, got {value}; "
                             f"q {q.shape}, k_pages {k_pages.shape}")
    if not interpret and rows < 16:
        raise ValueError(f"block_q * G' = {bq} * {gp} = {rows} rows < 16: Triton dots need 16; "
                         f"q {q.shape}, k_pages {k_pages.shape}, {config}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")

    meta = _work_list(kv_lens, cu_q_lens, num_seqs, num_tokens=t_total, block_q=bq)  # [4, W]
    num_items = meta.shape[1]
    table = page_table
    if m_pages % ppb:  # the kernel reads whole blocks of pages_per_block columns
        table = jnp.pad(page_table, ((0, 0), (0, ppb - m_pages % ppb)))  # [S, M']
    qg = q
    if gp != g:  # pad the group to a power of two with zero q heads
        qg = jnp.pad(q.reshape(t_total, k_heads, g, h), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
        qg = qg.reshape(t_total, k_heads * gp, h)
    n_padded = k_heads * gp

    splits = config.num_splits
    kernel = functools.partial(
        _ragged_paged_attention_kernel, group=gp, block_q=bq, pages_per_block=ppb,
        num_splits=splits, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        key_gather=config.key_gather, q_transposed=config.q_transposed,
        early_launch=pdl.enabled(interpret, "ragged_paged_attention"))
    whole = lambda *shape: pl.BlockSpec(shape, lambda w, kh, sp: (0,) * len(shape))  # noqa: E731
    if config.q_transposed:  # pad by block_q tokens: every tile's rows are in bounds
        rows_total = (t_total + bq) * gp
        qg = jnp.pad(qg.reshape(t_total, k_heads, gp, h), ((0, bq), (0, 0), (0, 0), (0, 0)))
        qg = qg.transpose(1, 0, 2, 3).reshape(k_heads, rows_total, h)  # [K, (T + bq) G', H]
        q_spec = pl.BlockSpec((None, rows_total, h), lambda w, kh, sp: (kh, 0, 0))
        o_dims, o_index = (k_heads, rows_total), lambda w, kh, sp: (kh, 0)
    else:
        q_spec = whole(t_total, n_padded, h)
        o_dims, o_index = (t_total, n_padded), lambda w, kh, sp: (0, 0)
    in_specs = [
        whole(4, num_items),  # meta
        whole(*table.shape),  # page_table
        q_spec,  # q (the kernel picks its KV head's rows, or gets only them if transposed)
        pl.BlockSpec((None, num_pages, page_size, h),
                     lambda w, kh, sp: (kh, 0, 0, 0)),  # k_pages of KV head kh (whole pool)
        pl.BlockSpec((None, num_pages, page_size, h),
                     lambda w, kh, sp: (kh, 0, 0, 0)),  # v_pages of KV head kh (whole pool)
    ]
    squeeze = (None,) if config.q_transposed else ()
    block = (*squeeze, *o_dims[len(squeeze):])
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((*o_dims, h), q.dtype)
        out_specs = pl.BlockSpec((*block, h), lambda w, kh, sp: (*o_index(w, kh, sp), 0))  # o
    else:
        out_shape = (jax.ShapeDtypeStruct((splits, *o_dims, h), jnp.float32),
                     jax.ShapeDtypeStruct((splits, *o_dims), jnp.float32),
                     jax.ShapeDtypeStruct((splits, *o_dims), jnp.float32))
        out_specs = (
            pl.BlockSpec((None, *block, h),
                         lambda w, kh, sp: (sp, *o_index(w, kh, sp), 0)),  # o part
            pl.BlockSpec((None, *block), lambda w, kh, sp: (sp, *o_index(w, kh, sp))),  # m
            pl.BlockSpec((None, *block), lambda w, kh, sp: (sp, *o_index(w, kh, sp))),  # l
        )
    out = pl.pallas_call(
        kernel,
        grid=(num_items, k_heads, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_bq{bq}_ppb{ppb}_sp{splits}",
    )(meta, table, qg, k_pages, v_pages)

    if splits > 1:  # flash-decoding combine
        o_part, m_part, l_part = out  # [sp, *o_dims, H], [sp, *o_dims], [sp, *o_dims]
        out = combine_splits(o_part, m_part, l_part, q.dtype)
    if config.q_transposed:
        out = out.reshape(k_heads, t_total + bq, gp, h)[:, :t_total].transpose(1, 0, 2, 3)
    if gp != g or config.q_transposed:
        out = out.reshape(t_total, k_heads, gp, h)[:, :, :g].reshape(t_total, n, h)
    return out


def combine_splits(o: jax.Array, m: jax.Array, l: jax.Array,  # noqa: E741
                   dtype: jnp.dtype) -> jax.Array:
    """Flash-decoding's merge of the KV splits, as jnp ops that XLA fuses.

    o f32[S, ..., H] are the splits' unnormalised outputs, m and l f32[S, ...] their rows'
    logit maxima (log2 units; -inf for a split without keys) and softmax sums. For each row::

        m*  = max over s of m[s]            (0 where every split is -inf: no keys at all)
        w_s = exp2(m[s] - m*)
        out = (sum_s w_s o[s]) / (sum_s w_s l[s])   (a zero sum: 1, so such rows give 0)

    rounded to `dtype`. XLA makes two fusions of it (the maximum, then the merge: 1.2 + 1.85 us
    per layer in the 8B batch-1 step at tp=2 with 12 splits) and one with 6 splits (1.73 us at
    tp=2's shapes, 1.97 at tp=1's; session 30, where 6 splits at tp=2 then slowed attention by
    0.74 us per layer at ctx 1024 and the step by 170 us at ctx 4096). Four other forms were built,
    tested and measured in that step on 2 x H200, and all were slower or no faster, so they
    were removed (BENCHMARKS.md sections 0u-0w; each stays in git): one Pallas launch (4.7 us
    per layer, session 24), the splits unrolled as static slices (XLA still made two fusions,
    session 25), the merge by each tile's last split inside the attention kernel (11.9 us
    against 7.2 + 3.1, session 25), and one variadic reduce carrying (max, sum, output) (XLA
    made a 3.5 us reduce fusion plus a 1.3 us convert, session 26).
    """
    m_max = jnp.max(m, axis=0)
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    weight = jnp.exp2(m - m_max[None])  # [S, ...]; 0 for splits without keys
    l_sum = jnp.sum(weight * l, axis=0)
    out = jnp.sum(weight[..., None] * o, axis=0)
    return (out / jnp.where(l_sum == 0, 1.0, l_sum)[..., None]).astype(dtype)


def _write_kv_pages_kernel(
    slot_ref,  # i32[T]
    k_new_ref,  # [T, K, H]
    v_new_ref,  # [T, K, H]
    k_in_ref,  # [K, P, L, H] (aliased to k_out_ref; not read)
    v_in_ref,  # [K, P, L, H] (aliased to v_out_ref; not read)
    k_out_ref,  # [K, P, L, H]
    v_out_ref,  # [K, P, L, H]
    *,
    page_size: int,
):
    """One program: one token's K and V row of one KV head, stored into its slot."""
    del k_in_ref, v_in_ref
    t, kh = pl.program_id(0), pl.program_id(1)
    slot = slot_ref[t]
    page, offset = slot // page_size, slot % page_size
    k_out_ref[kh, page, offset, :] = k_new_ref[t, kh, :].astype(k_out_ref.dtype)
    v_out_ref[kh, page, offset, :] = v_new_ref[t, kh, :].astype(v_out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_kv_pages(
    k_pages: jax.Array,  # [K, P, L, H]
    v_pages: jax.Array,  # [K, P, L, H]
    k_new: jax.Array,  # [T, K, H]
    v_new: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # i32[T]; page * L + offset (padding rows -> slots of page 0)
    *,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Writes this step's K/V rows into their slots with a Pallas kernel, in place (aliased).

    The pools are aliased to the outputs; the caller's jit must donate them (as the model step
    does) or XLA inserts a copy of the whole pool.
    """
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages and v_pages must both be [K, P, L, H], got {k_pages.shape} "
                         f"and {v_pages.shape}")
    k_heads, num_pages, page_size, h = k_pages.shape
    t_total = slot_mapping.shape[0]
    if k_new.shape != (t_total, k_heads, h) or v_new.shape != k_new.shape:
        raise ValueError(f"k_new and v_new must be [T, K, H] = [{t_total}, {k_heads}, {h}], got "
                         f"{k_new.shape} and {v_new.shape}")
    if slot_mapping.ndim != 1 or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"slot_mapping must be i32[T], got {slot_mapping.shape} "
                         f"{slot_mapping.dtype}")
    slots = jnp.clip(slot_mapping, 0, num_pages * page_size - 1)  # never write out of the pool
    pool_spec = pl.BlockSpec((k_heads, num_pages, page_size, h), lambda t, kh: (0, 0, 0, 0))
    row_spec = pl.BlockSpec((t_total, k_heads, h), lambda t, kh: (0, 0, 0))
    return pl.pallas_call(
        functools.partial(_write_kv_pages_kernel, page_size=page_size),
        grid=(t_total, k_heads),
        in_specs=[
            pl.BlockSpec((t_total,), lambda t, kh: (0,)),  # slot_mapping (whole)
            row_spec,  # k_new (whole)
            row_spec,  # v_new (whole)
            pool_spec,  # k_pages (aliased to output 0)
            pool_spec,  # v_pages (aliased to output 1)
        ],
        out_specs=(pool_spec, pool_spec),
        out_shape=(jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)),
        input_output_aliases={3: 0, 4: 1},
        compiler_params=compiler_params(1, 1),
        interpret=interpret,
        name="write_kv_pages",
    )(slots, k_new, v_new, k_pages, v_pages)


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [K, P, L, H]
    v_pages: jax.Array,  # [K, P, L, H]
    kv_lens: jax.Array,  # i32[S]
    page_table: jax.Array,  # i32[S, M]
    cu_q_lens: jax.Array,  # i32[S+1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:  # [T, N, H]
    """Pure-jnp ragged paged attention with float32 accumulation; written for clarity."""
    check_inputs(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs)
    t_total, n, h = q.shape
    k_heads, _, page_size, _ = k_pages.shape
    s_max, m = page_table.shape
    g = n // k_heads
    num_seqs = num_seqs.reshape(())

    rows = jnp.arange(t_total, dtype=jnp.int32)  # [T]
    seq = jnp.searchsorted(cu_q_lens[1:], rows, side="right").astype(jnp.int32)  # [T]
    seq = jnp.minimum(seq, s_max - 1)
    real = rows < cu_q_lens[num_seqs]  # [T]
    q_start = cu_q_lens[seq]
    q_len = cu_q_lens[seq + 1] - q_start
    q_pos = kv_lens[seq] - q_len + (rows - q_start)  # [T]

    pages = page_table[seq]  # [T, M]
    k = k_pages[:, pages].reshape(k_heads, t_total, m * page_size, h)  # [K, T, S, H]
    v = v_pages[:, pages].reshape(k_heads, t_total, m * page_size, h)  # [K, T, S, H]
    k_pos = jnp.arange(m * page_size, dtype=jnp.int32)  # [S]
    mask = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < kv_lens[seq][:, None])
    mask &= real[:, None]  # [T, S]
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window

    qg = q.reshape(t_total, k_heads, g, h).astype(jnp.float32)  # [T, K, G, H]
    logits = jnp.einsum("tkgh,ktsh->tkgs", qg, k.astype(jnp.float32)) * sm_scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(mask[:, None, None, :], logits, -jnp.inf)
    m_row = jnp.max(logits, axis=-1, keepdims=True)
    m_row = jnp.where(jnp.isfinite(m_row), m_row, 0.0)
    p = jnp.exp(logits - m_row)  # masked entries are exp(-inf) = 0
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0, 1.0, denom)  # rows with no key (padding) give 0
    o = jnp.einsum("tkgs,ktsh->tkgh", p, v.astype(jnp.float32))
    return o.reshape(t_total, n, h).astype(q.dtype)


def write_kv_pages_reference(
    k_pages: jax.Array,  # [K, P, L, H]
    v_pages: jax.Array,  # [K, P, L, H]
    k_new: jax.Array,  # [T, K, H]
    v_new: jax.Array,  # [T, K, H]
    slot_mapping: jax.Array,  # i32[T]; page * L + offset (padding rows -> slots of page 0)
) -> tuple[jax.Array, jax.Array]:
    """Scatters this step's K/V rows into their slots. In place when the pools are donated."""
    k_heads, p, page_size, h = k_pages.shape
    flat_k = k_pages.reshape(k_heads, p * page_size, h)
    flat_v = v_pages.reshape(k_heads, p * page_size, h)
    flat_k = flat_k.at[:, slot_mapping].set(k_new.swapaxes(0, 1).astype(k_pages.dtype))
    flat_v = flat_v.at[:, slot_mapping].set(v_new.swapaxes(0, 1).astype(v_pages.dtype))
    return flat_k.reshape(k_pages.shape), flat_v.reshape(v_pages.shape)
