"""rope_write_kv (q/k/v epilogue of a decode-sized step): the Pallas kernel vs the reference and
vs the model's unfused path (sum, rope, write_kv_pages).

`TestRopeWriteKv` (INTERPRET = False) runs compiled on a GPU and skips elsewhere;
`TestRopeWriteKvInterpret` runs the same cases through the Pallas interpreter on CPU (CI).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_modes import CompiledOrInterpreted
from xlaserve.pallas_kernels.ragged_paged_attention import write_kv_pages_reference
from xlaserve.pallas_kernels.rope_write_kv import rope_write_kv, rope_write_kv_reference
from xlaserve.runtime.config import RopeScaling
from xlaserve.runtime.models.layers import apply_rope, rope_inv_freq, rope_tables

# (splits S, tokens T, q heads N, KV heads K, head dim H, pages P, page size L)
CASES = [
    (4, 16, 16, 4, 128, 12, 16),  # the 8B model's q/k/v at tp 2 (G 4), T16 bucket
    (1, 5, 8, 8, 64, 7, 32),  # G 1, no split-K, T not a multiple of 8
    (2, 9, 8, 1, 128, 5, 64),  # G 8
    (3, 3, 28, 4, 64, 4, 16),  # G 7 (Qwen2.5-7B's group)
]


def _case_id(case) -> str:
    s, t, n, k, h, p, pl_ = case
    return f"S{s}-T{t}-N{n}-K{k}-H{h}-L{pl_}"


def _inputs(case, dtype, seed=0):
    s, t, n, k, h, p, page = case
    key = jax.random.key(seed)
    parts = jax.random.normal(key, (s, t, (n + 2 * k) * h), jnp.float32)
    positions = jax.random.randint(jax.random.fold_in(key, 1), (t,), 0, 4096).astype(jnp.int32)
    cos, sin = rope_tables(positions, rope_inv_freq(h, 500000.0, RopeScaling()))
    rng = np.random.RandomState(seed)
    slots = jnp.asarray(rng.permutation(p * page)[:t], jnp.int32)  # distinct, scattered
    k_pages = jax.random.normal(jax.random.fold_in(key, 2), (k, p, page, h)).astype(dtype)
    v_pages = jax.random.normal(jax.random.fold_in(key, 3), (k, p, page, h)).astype(dtype)
    return parts, positions, cos, sin, slots, k_pages, v_pages


def _tol(dtype):
    return dict(rtol=1e-2, atol=1e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)


def _f32(a):
    return np.asarray(jnp.asarray(a, jnp.float32))


class TestRopeWriteKv(CompiledOrInterpreted):
    """Compiled kernel vs reference; skips without a GPU. The subclass interprets on CPU."""

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize("case", CASES, ids=_case_id)
    def test_matches_reference(self, case, dtype):
        parts, _, cos, sin, slots, k_pages, v_pages = _inputs(case, dtype)
        n = case[2]
        want = rope_write_kv_reference(parts, cos, sin, slots, k_pages, v_pages,
                                       num_q_heads=n, dtype=dtype)
        got = rope_write_kv(parts, cos, sin, slots, k_pages, v_pages, num_q_heads=n,
                            dtype=dtype, interpret=self.INTERPRET)
        assert got[0].shape == (case[1], n, case[4]) and got[0].dtype == dtype
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(_f32(g), _f32(w), **_tol(dtype))
        # slots not written keep their contents bit for bit
        kh, p, page, h = k_pages.shape
        untouched = np.setdiff1d(np.arange(p * page), np.asarray(slots))
        for g, before in ((got[1], k_pages), (got[2], v_pages)):
            np.testing.assert_array_equal(
                _f32(g).reshape(kh, p * page, h)[:, untouched],
                _f32(before).reshape(kh, p * page, h)[:, untouched])

    @pytest.mark.parametrize("rows", [1, 3])
    def test_padding_rows(self, rows):
        """Rows from `rows` on: q zeros, nothing stored (their slots keep their contents); the
        real rows as without padding."""
        case = CASES[0]
        parts, _, cos, sin, slots, k_pages, v_pages = _inputs(case, jnp.bfloat16, seed=5)
        n = case[2]
        r = jnp.array([rows], jnp.int32)
        want = rope_write_kv_reference(parts, cos, sin, slots, k_pages, v_pages, r,
                                       num_q_heads=n, dtype=jnp.bfloat16)
        got = rope_write_kv(parts, cos, sin, slots, k_pages, v_pages, r, num_q_heads=n,
                            dtype=jnp.bfloat16, interpret=self.INTERPRET)
        full = rope_write_kv_reference(parts, cos, sin, slots, k_pages, v_pages,
                                       num_q_heads=n, dtype=jnp.bfloat16)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(_f32(g), _f32(w), **_tol(jnp.bfloat16))
        q = _f32(got[0])
        assert (q[rows:] == 0).all()
        np.testing.assert_allclose(q[:rows], _f32(full[0])[:rows], **_tol(jnp.bfloat16))
        kh, p, page, h = k_pages.shape
        flat = _f32(got[1]).reshape(kh, p * page, h)
        before = _f32(k_pages).reshape(kh, p * page, h)
        pad_slots = np.asarray(slots)[rows:]
        np.testing.assert_array_equal(flat[:, pad_slots], before[:, pad_slots])
        real_slots = np.asarray(slots)[:rows]
        np.testing.assert_allclose(flat[:, real_slots],
                                   _f32(full[1]).reshape(kh, p * page, h)[:, real_slots],
                                   **_tol(jnp.bfloat16))

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    def test_matches_the_unfused_model_path(self, dtype):
        """Against what the model computes without the kernel: the partials summed and rounded,
        layers.apply_rope on q and k, write_kv_pages' scatter."""
        case = CASES[0]
        parts, positions, cos, sin, slots, k_pages, v_pages = _inputs(case, dtype, seed=3)
        _, t, n, k, h, _, _ = case
        y = parts.sum(axis=0).astype(dtype).reshape(t, n + 2 * k, h)
        inv_freq = rope_inv_freq(h, 500000.0, RopeScaling())
        q = apply_rope(y[:, :n], positions, inv_freq)
        k_new = apply_rope(y[:, n:n + k], positions, inv_freq)
        want_k, want_v = write_kv_pages_reference(k_pages, v_pages, k_new, y[:, n + k:], slots)
        got = rope_write_kv(parts, cos, sin, slots, k_pages, v_pages, num_q_heads=n,
                            dtype=dtype, interpret=self.INTERPRET)
        for g, w in zip(got, (q, want_k, want_v), strict=True):
            np.testing.assert_allclose(_f32(g), _f32(w), **_tol(dtype))

    def test_rejects_bad_shapes(self):
        parts, _, cos, sin, slots, k_pages, v_pages = _inputs(CASES[1], jnp.float32)
        with pytest.raises(ValueError, match="parts"):
            rope_write_kv(parts[:, :, :-64], cos, sin, slots, k_pages, v_pages, num_q_heads=8,
                          dtype=jnp.float32, interpret=True)
        with pytest.raises(ValueError, match="num_q_heads=6"):
            rope_write_kv(parts, cos, sin, slots, k_pages, v_pages, num_q_heads=6,
                          dtype=jnp.float32, interpret=True)
        with pytest.raises(ValueError, match="cos"):
            rope_write_kv(parts, cos[:, :8], sin, slots, k_pages, v_pages, num_q_heads=8,
                          dtype=jnp.float32, interpret=True)


class TestRopeWriteKvInterpret(TestRopeWriteKv):
    INTERPRET = True
