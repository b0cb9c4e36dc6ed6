"""rope_write_attention (q/k/v epilogue + ragged paged attention in one launch) vs the reference
(rope_write_kv_reference, then ragged_paged_attention_reference).

Random ragged decode-sized batches (from test_ragged_paged_attention.make_batch): decode rows
and short chunks, permuted page tables, padded sequences with garbage metadata, padding rows
whose partials are NaN (they must not leak), stale values in the slots this step writes.
`TestRopeWriteAttention` (INTERPRET = False) runs compiled on a GPU and skips elsewhere;
`TestRopeWriteAttentionInterpret` runs the same cases through the Pallas interpreter on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_modes import CompiledOrInterpreted
from test_ragged_paged_attention import make_batch, relative_error, tolerance
from xlaserve.pallas_kernels.ragged_paged_attention import RaggedPagedAttentionConfig as Cfg
from xlaserve.pallas_kernels.rope_write_attention import (
    rope_write_attention,
    rope_write_attention_reference,
)
from xlaserve.runtime.config import RopeScaling
from xlaserve.runtime.models.layers import rope_inv_freq, rope_tables

# (q lens, page size, head dim, group, KV heads, dtype, config, split-K slices)
CASES = [
    ([1], 16, 128, 4, 4, jnp.bfloat16, Cfg(block_q=4, pages_per_block=8, num_splits=4), 4),
    ([1, 1, 1, 1, 1], 16, 128, 4, 2, jnp.bfloat16, Cfg(block_q=4, pages_per_block=2), 4),
    ([1, 7, 1, 3, 16], 16, 64, 1, 2, jnp.float32, Cfg(block_q=16, pages_per_block=2), 2),
    ([1, 15, 16, 17, 1], 16, 64, 8, 1, jnp.bfloat16,
     Cfg(block_q=2, pages_per_block=1, num_splits=3), 1),
    ([3, 1, 31, 2], 32, 128, 4, 2, jnp.float32, Cfg(block_q=4, pages_per_block=2,
                                                    num_splits=2), 4),
    ([1, 1, 2], 64, 64, 2, 2, jnp.bfloat16, Cfg(block_q=8, pages_per_block=1), 2),
]


def _case_id(case) -> str:
    q_lens, page, h, g, k, dtype, cfg, s = case
    return (f"q{'-'.join(map(str, q_lens))}-L{page}-H{h}-G{g}-K{k}-{jnp.dtype(dtype).name}"
            f"-bq{cfg.block_q}-ppb{cfg.pages_per_block}-sp{cfg.num_splits}-S{s}")


def _inputs(case, seed=0, extra_tokens=3):
    """(args of the op, num_q_heads, dtype, slots of the real tokens, real token count)."""
    q_lens, page, h, g, k, dtype, _, s = case
    batch = make_batch(seed, q_lens, page_size=page, head_dim=h, group=g, num_kv_heads=k,
                       dtype=dtype, extra_tokens=extra_tokens)
    n = k * g
    t_real = batch.num_real_tokens
    t = batch.q.shape[0]
    kv, table, cu = (np.asarray(a) for a in (batch.kv_lens, batch.page_table, batch.cu_q_lens))
    positions = np.zeros(t, np.int32)
    slots = np.zeros(t, np.int32)  # padding rows: slot 0 (page 0), never stored
    for seq, q_len in enumerate(q_lens):
        for i in range(q_len):
            pos = kv[seq] - q_len + i
            row = cu[seq] + i
            positions[row] = pos
            slots[row] = table[seq, pos // page] * page + pos % page
    rng = np.random.default_rng(seed + 1)
    parts = rng.standard_normal((s, t, (n + 2 * k) * h)).astype(np.float32)
    parts[:, t_real:] = np.nan  # padding rows must not leak
    cos, sin = rope_tables(jnp.asarray(positions), rope_inv_freq(h, 10000.0, RopeScaling()))
    rows = jnp.asarray([t_real], jnp.int32)
    args = (jnp.asarray(parts), cos, sin, jnp.asarray(slots), rows, batch.k_pages, batch.v_pages,
            batch.kv_lens, batch.page_table, batch.cu_q_lens, batch.num_seqs)
    return args, n, dtype, slots[:t_real], t_real


def _f32(a):
    return np.asarray(jnp.asarray(a, jnp.float32))


class TestRopeWriteAttention(CompiledOrInterpreted):
    """Compiled kernel vs reference; skips without a GPU. The subclass interprets on CPU."""

    def _check(self, case, seed=0, extra_tokens=3, **kw):
        args, n, dtype, slots, t_real = _inputs(case, seed, extra_tokens)
        cfg = case[6]
        common = dict(num_q_heads=n, dtype=dtype, sm_scale=case[2] ** -0.5, **kw)
        want = rope_write_attention_reference(*args, **common)
        got = rope_write_attention(*args, config=cfg, interpret=self.INTERPRET, **common)
        o = _f32(got[0])
        assert got[0].shape == (args[3].shape[0], n, case[2]) and got[0].dtype == dtype
        assert np.isfinite(o).all()
        assert relative_error(o[:t_real], _f32(want[0])[:t_real]) < tolerance(
            dtype, self.INTERPRET)
        np.testing.assert_array_equal(o[t_real:], 0.0)  # padding rows
        k_pages = args[5]
        kh, p, page, h = k_pages.shape
        untouched = np.setdiff1d(np.arange(p * page), slots)
        for g, w, before in ((got[1], want[1], args[5]), (got[2], want[2], args[6])):
            g, w = _f32(g).reshape(kh, p * page, h), _f32(w).reshape(kh, p * page, h)
            # this step's K/V (rope in float32, rounded): as the reference wrote them
            np.testing.assert_allclose(g[:, slots], w[:, slots], rtol=1e-5, atol=1e-5)
            # every other slot keeps its contents bit for bit
            np.testing.assert_array_equal(
                g[:, untouched], _f32(before).reshape(kh, p * page, h)[:, untouched])

    @pytest.mark.parametrize("case", CASES, ids=_case_id)
    def test_matches_reference(self, case):
        self._check(case)

    @pytest.mark.parametrize("window", [1, 5, 40])
    def test_sliding_window(self, window):
        self._check(CASES[3], seed=2, sliding_window=window)

    def test_no_padding_rows(self):
        """Every row real (the tile's clamped rows repeat the last real token)."""
        self._check(CASES[0], seed=4, extra_tokens=0)
        self._check(CASES[2], seed=5, extra_tokens=0)

    def test_soft_cap(self):
        self._check(CASES[2], seed=3, soft_cap=5.0)

    def test_rejects_bad_inputs(self):
        args, n, dtype, _, _ = _inputs(CASES[1])
        kw = dict(num_q_heads=n, dtype=dtype, sm_scale=1.0, interpret=True)
        with pytest.raises(ValueError, match="parts"):
            rope_write_attention(args[0][:, :, :-2], *args[1:], **kw)
        with pytest.raises(ValueError, match="power of two"):  # G 3
            three = jnp.zeros((4, args[0].shape[1], (6 + 4) * 128), jnp.float32)
            rope_write_attention(three, *args[1:], **{**kw, "num_q_heads": 6})


class TestRopeWriteAttentionInterpret(TestRopeWriteAttention):
    INTERPRET = True


@pytest.mark.parametrize("seed", [11, 12])
def test_random_decode_batches(seed):
    """Random decode-only and mixed small batches (interpreted) against the reference."""
    rng = np.random.default_rng(seed)
    q_lens = [int(x) for x in rng.choice([1, 1, 1, 2, 5], size=6)]
    case = (q_lens, 16, 64, 4, 2, jnp.bfloat16, Cfg(block_q=4, pages_per_block=2,
                                                    num_splits=2), 3)
    TestRopeWriteAttentionInterpret()._check(case, seed=seed)


def test_jax_version_independent_shapes():
    """The op keeps the pools' shapes and dtypes (aliased outputs)."""
    args, n, dtype, _, _ = _inputs(CASES[1])
    got = jax.eval_shape(lambda *a: rope_write_attention(
        *a, num_q_heads=n, dtype=dtype, sm_scale=1.0, config=CASES[1][6], interpret=True),
        *args)
    assert got[1].shape == args[5].shape and got[2].dtype == args[6].dtype
