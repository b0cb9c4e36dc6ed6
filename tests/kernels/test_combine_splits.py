"""combine_splits (flash-decoding's merge of KV splits): the Pallas kernel vs the jnp reference,
and ragged_paged_attention with combine="pallas" vs the attention reference.

`TestCombineSplits` (INTERPRET = False) runs compiled on a GPU and skips elsewhere;
`TestCombineSplitsInterpret` runs the same cases through the Pallas interpreter on CPU (CI).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_modes import CompiledOrInterpreted
from test_ragged_paged_attention import make_batch, relative_error, tolerance
from xlaserve.pallas_kernels.combine_splits import (block_rows_for, combine_splits,
                                                    combine_splits_reduce,
                                                    combine_splits_reference)
from xlaserve.pallas_kernels.ragged_paged_attention import (RaggedPagedAttentionConfig,
                                                            ragged_paged_attention,
                                                            ragged_paged_attention_reference)

# (splits S, rows X, head dim H): the 8B batch-1 step at tp 2 / 1 (T16 x 16 / 32 q heads with
# 12 / 6 splits), rows not a multiple of 16, one split
CASES = [(12, 256, 128), (6, 512, 128), (3, 40, 64), (5, 7, 64), (1, 16, 64)]


def _inputs(s, x, h, seed=0):
    """Random partials; some splits without keys (m = -inf, l = 0, o = 0), one row with none."""
    key = jax.random.key(seed)
    o = jax.random.normal(key, (s, x, h), jnp.float32) * 3
    m = jax.random.normal(jax.random.fold_in(key, 1), (s, x), jnp.float32) * 4
    l = jax.random.uniform(jax.random.fold_in(key, 2), (s, x), jnp.float32, 0.5, 20.0)  # noqa: E741
    empty = jax.random.bernoulli(jax.random.fold_in(key, 3), 0.3, (s, x)).at[:, 0].set(True)
    m = jnp.where(empty, -jnp.inf, m)
    return jnp.where(empty[..., None], 0.0, o), m, jnp.where(empty, 0.0, l)  # noqa: E741


class TestCombineSplits(CompiledOrInterpreted):
    """Compiled kernel vs reference; skips without a GPU. The subclass interprets on CPU."""

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize("case", CASES, ids=lambda c: f"S{c[0]}-X{c[1]}-H{c[2]}")
    def test_matches_reference(self, case, dtype):
        o, m, l = _inputs(*case)  # noqa: E741
        out = combine_splits(o, m, l, dtype=dtype, interpret=self.INTERPRET)
        ref = combine_splits_reference(o, m, l, dtype)
        assert out.shape == (case[1], case[2]) and out.dtype == dtype
        got, want = np.asarray(out, np.float32), np.asarray(ref, np.float32)
        assert np.isfinite(got).all()
        assert not got[0].any()  # the row without keys: 0, not NaN
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)

    @pytest.mark.parametrize("combine", ["pallas", "reduce"])
    @pytest.mark.parametrize("q_transposed", [False, True], ids=["direct", "transposed"])
    def test_attention_with_combine(self, q_transposed, combine):
        """The attention op with its splits merged by the kernel, or by the one variadic reduce,
        matches the reference."""
        batch = make_batch(3, [1, 1, 5], page_size=16, head_dim=64, group=4, extra_tokens=0)
        batch = dataclasses.replace(batch, kv_lens=batch.kv_lens.at[:3].set(
            jnp.asarray([1, 40, 48])))
        cfg = RaggedPagedAttentionConfig(block_q=4, pages_per_block=1, num_splits=5,
                                         q_transposed=q_transposed, combine=combine)
        out = ragged_paged_attention(*batch.args, sm_scale=0.125, config=cfg,
                                     interpret=self.INTERPRET)
        ref = ragged_paged_attention_reference(*batch.args, sm_scale=0.125)
        t = batch.num_real_tokens
        assert relative_error(out[:t], ref[:t]) < tolerance(batch.q.dtype, self.INTERPRET)
        assert not np.asarray(out[t:], np.float32).any(), "padded rows must be 0"


class TestCombineSplitsInterpret(TestCombineSplits):
    INTERPRET = True


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"S{c[0]}-X{c[1]}-H{c[2]}")
def test_reduce_form_matches_reference(case, dtype):
    """The variadic-reduce merge (combine="reduce") against the two-pass jnp reference, with
    splits and a row without keys; also with a leading row shape ([S, T, N, H], as attention
    calls it)."""
    o, m, l = _inputs(*case)  # noqa: E741
    ref = np.asarray(combine_splits_reference(o, m, l, dtype), np.float32)
    got = np.asarray(jax.jit(combine_splits_reduce, static_argnums=3)(o, m, l, dtype),
                     np.float32)
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert not got[0].any()  # the row without keys: 0, not NaN
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol)
    s, x, h = case
    if x % 4 == 0:
        o4, m4, l4 = o.reshape(s, x // 4, 4, h), m.reshape(s, x // 4, 4), l.reshape(s, x // 4, 4)
        got4 = np.asarray(combine_splits_reduce(o4, m4, l4, dtype), np.float32)
        np.testing.assert_allclose(got4.reshape(x, h), ref, rtol=tol, atol=tol)


def test_block_rows_and_validation():
    assert [block_rows_for(x) for x in (256, 40, 7, 24)] == [16, 8, 1, 8]
    o, m, l = _inputs(2, 8, 64)  # noqa: E741
    with pytest.raises(ValueError, match="o f32"):
        combine_splits(o.astype(jnp.bfloat16), m, l, dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match="H=48"):
        combine_splits(o[..., :48], m, l, dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match="combine"):
        RaggedPagedAttentionConfig(combine="triton")
