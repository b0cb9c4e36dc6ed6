"""The fused all-reduce + residual add + RMSNorm as a Pallas kernel
(pallas_kernels/all_reduce_norm.py) at one rank: the partials' sum, the roundings, the norm
and the padding rows against the reference, compiled on a GPU and interpreted on CPU (CI). The
exchange between ranks (PTX, GPUs only) is tested against the PTX kernel in
tests/sharding/test_all_reduce.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_modes import CompiledOrInterpreted
from xlaserve.pallas_kernels.all_reduce_norm import (
    Exchange,
    all_reduce_add_rms_norm,
    all_reduce_add_rms_norm_reference,
)
from xlaserve.runtime.models.layers import add_rms_norm

# (T, rows, D, splits): bf16 parts (0) or float32 split-K partials; padding rows after `rows`
CASES = [(1, 1, 256, 2), (5, 3, 128, 0), (16, 16, 512, 4), (8, 1, 64, 1)]


def _inputs(t, d, splits, seed=0):
    key = jax.random.key(seed)
    shape = (splits, t, d) if splits else (t, d)
    x = jax.random.normal(key, shape, jnp.float32) * 3
    residual = jax.random.normal(jax.random.fold_in(key, 1), (t, d), jnp.float32)
    scale = jnp.linspace(0.5, 1.5, d).astype(jnp.bfloat16)
    return (x if splits else x.astype(jnp.bfloat16)), residual.astype(jnp.bfloat16), scale


class TestAllReduceNorm(CompiledOrInterpreted):

    @pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-rows{c[1]}-D{c[2]}-S{c[3]}")
    def test_one_rank_matches_reference(self, case):
        t, rows, d, splits = case
        x, residual, scale = _inputs(t, d, splits)
        new, h = all_reduce_add_rms_norm(x, residual, scale, jnp.zeros((1,), jnp.int32),
                                         jnp.array([rows], jnp.int32), eps=1e-5,
                                         interpret=self.INTERPRET)
        want_new, want_h = all_reduce_add_rms_norm_reference(x[None], residual, scale, rows,
                                                             1e-5)
        assert new.shape == h.shape == (t, d) and new.dtype == h.dtype == jnp.bfloat16
        new, h = np.asarray(new, np.float32), np.asarray(h, np.float32)
        np.testing.assert_array_equal(new, np.asarray(want_new, np.float32))
        np.testing.assert_allclose(h, np.asarray(want_h, np.float32), rtol=1.6e-2, atol=1e-2)
        assert (new[rows:] == 0).all() and (h[rows:] == 0).all()
        # the reference is layers.add_rms_norm of the rounded sum on the live rows
        part = (x.sum(axis=0) if splits else x.astype(jnp.float32)).astype(jnp.bfloat16)
        plain_new, plain_h = add_rms_norm(residual, part, scale, 1e-5)
        np.testing.assert_array_equal(np.asarray(want_new, np.float32)[:rows],
                                      np.asarray(plain_new, np.float32)[:rows])
        np.testing.assert_array_equal(np.asarray(want_h, np.float32)[:rows],
                                      np.asarray(plain_h, np.float32)[:rows])


class TestAllReduceNormInterpret(TestAllReduceNorm):
    INTERPRET = True


def test_rejects_bad_inputs():
    x, residual, scale = _inputs(4, 128, 0)
    one = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match=r"residual \(4, 96\)"):
        all_reduce_add_rms_norm(x[:, :96], residual[:, :96], scale[:96], one, one, eps=1e-5,
                                interpret=True)  # D not a power of two
    with pytest.raises(ValueError, match=r"scale \(64,\)"):
        all_reduce_add_rms_norm(x, residual, scale[:64], one, one, eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="float32"):
        all_reduce_add_rms_norm(x[None], residual, scale, one, one, eps=1e-5, interpret=True)
    with pytest.raises(ValueError, match="interpret"):
        all_reduce_add_rms_norm(x, residual, scale, one, one, eps=1e-5, interpret=True,
                                exchange=Exchange((1 << 40, 1 << 41)))
    with pytest.raises(ValueError, match="16-byte aligned"):
        Exchange((1 << 40, 3))
