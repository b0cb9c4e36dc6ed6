"""combine_splits (flash-decoding's merge of the KV splits, jnp) against the same merge in
float64 numpy, with splits and rows that have no keys. The attention tests cover it inside the
op (num_splits > 1 against the attention reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.pallas_kernels.ragged_paged_attention import combine_splits

# (splits S, rows X, head dim H): the 8B batch-1 step at tp 2 / 1 (T16 x 16 / 32 q heads with
# 12 / 6 splits), a few rows, one split
CASES = [(12, 256, 128), (6, 512, 128), (3, 40, 64), (1, 16, 64)]


def _inputs(s, x, h, seed=0):
    """Random partials; some splits without keys (m = -inf, l = 0, o = 0), row 0 with none."""
    key = jax.random.key(seed)
    o = jax.random.normal(key, (s, x, h), jnp.float32) * 3
    m = jax.random.normal(jax.random.fold_in(key, 1), (s, x), jnp.float32) * 4
    l = jax.random.uniform(jax.random.fold_in(key, 2), (s, x), jnp.float32, 0.5, 20.0)  # noqa: E741
    empty = jax.random.bernoulli(jax.random.fold_in(key, 3), 0.3, (s, x)).at[:, 0].set(True)
    m = jnp.where(empty, -jnp.inf, m)
    return jnp.where(empty[..., None], 0.0, o), m, jnp.where(empty, 0.0, l)  # noqa: E741


def _numpy_merge(o, m, l):  # noqa: E741
    o, m, l = (np.asarray(a, np.float64) for a in (o, m, l))  # noqa: E741
    out = np.zeros(o.shape[1:])
    for x in range(o.shape[1]):
        live = np.isfinite(m[:, x])
        if not live.any():
            continue  # no keys in any split: 0
        w = np.exp2(m[live, x] - m[live, x].max())
        out[x] = (w[:, None] * o[live, x]).sum(0) / (w * l[live, x]).sum()
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"S{c[0]}-X{c[1]}-H{c[2]}")
def test_matches_numpy(case, dtype):
    o, m, l = _inputs(*case)  # noqa: E741
    got = np.asarray(jax.jit(combine_splits, static_argnums=3)(o, m, l, dtype), np.float32)
    assert got.shape == (case[1], case[2]) and np.isfinite(got).all()
    assert not got[0].any()  # the row without keys: 0, not NaN
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(got, _numpy_merge(o, m, l), rtol=tol, atol=tol)
