"""The `ragged_paged_attention` op and its dispatcher.

Implementations (each with the op's signature, all tested against the reference):
  "reference"  pure jnp (any platform)
The dispatcher picks one by platform and shape, logs its choice once per (platform, shape class),
and raises if an explicitly requested implementation is unavailable: it never falls back silently.
"""

from __future__ import annotations

import logging

import jax

from xlaserve.pallas_kernels.ragged_paged_attention import (
    ragged_paged_attention_reference,
    write_kv_pages_reference,
)

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "reference")


def available_implementations(platform: str | None = None) -> dict[str, str]:
    """Maps implementation name -> "available" or the reason it is not, on `platform`."""
    return {"reference": "available"}


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           kv_lens: jax.Array, page_table: jax.Array, cu_q_lens: jax.Array,
                           num_seqs: jax.Array, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           impl: str = "auto") -> jax.Array:
    """Dispatches to an implementation of ragged paged attention. See ragged_paged_attention.py."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}: must be one of {IMPLEMENTATIONS}")
    return ragged_paged_attention_reference(
        q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap)


write_kv_pages = write_kv_pages_reference
