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

This file holds the pure-jnp reference, the ground truth of every implementation of the op.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
