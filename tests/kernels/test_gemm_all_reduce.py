"""`gemm_all_reduce` (o_proj / down_proj with the all-reduce, the residual add and the norm's
sums of squares in the GEMM's epilogue) at one rank: the GEMM, the rounding, the padding rows
and ss against the reference, compiled on a GPU and interpreted on CPU (CI). The exchange
between ranks (PTX, GPUs only) is tested in tests/sharding/test_all_reduce.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_modes import CompiledOrInterpreted
from xlaserve.pallas_kernels.gemm_all_reduce import (
    Exchange,
    gemm_all_reduce,
    gemm_all_reduce_reference,
)
from xlaserve.pallas_kernels.skinny_gemm import SkinnyGemmConfig

Cfg = SkinnyGemmConfig
CASES = [(1, 1, 256, 128, Cfg(block_n=32, block_k=64, num_splits=1, num_stages=2)),
         (5, 3, 128, 64, Cfg(block_n=16, block_k=128, num_splits=1)),
         (16, 16, 512, 256, Cfg(block_n=64, block_k=64, num_splits=1, num_warps=8))]


def _inputs(m, k, n, seed=0):
    key = jax.random.key(seed)
    x = jax.random.normal(key, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.fold_in(key, 1), (k, n), jnp.float32) * 0.05
         ).astype(jnp.bfloat16)
    residual = jax.random.normal(jax.random.fold_in(key, 2), (m, n), jnp.float32
                                 ).astype(jnp.bfloat16)
    return x, w, residual


class TestGemmAllReduce(CompiledOrInterpreted):

    @pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-rows{c[1]}-K{c[2]}-N{c[3]}")
    def test_one_rank_matches_reference(self, case):
        m, rows, k, n, cfg = case
        x, w, residual = _inputs(m, k, n)
        v, ss = gemm_all_reduce(x, w, residual, jnp.zeros((1,), jnp.int32),
                                jnp.array([rows], jnp.int32), config=cfg,
                                interpret=self.INTERPRET)
        want_v, want_ss = gemm_all_reduce_reference(x[None], w[None], residual, rows,
                                                    cfg.block_n)
        assert v.shape == (m, n) and v.dtype == jnp.bfloat16
        assert ss.shape == (n // cfg.block_n, m) and ss.dtype == jnp.float32
        v32, want32 = np.asarray(v, np.float32), np.asarray(want_v, np.float32)
        # the product's float32 sums may round to neighbouring bf16 values
        np.testing.assert_allclose(v32, want32, rtol=2e-2, atol=2e-2)
        assert np.mean(v32 == want32) > 0.95
        assert (v32[rows:] == 0).all() and (np.asarray(ss)[:, rows:] == 0).all()
        # ss is exactly the kernel's own v squared and summed per program
        np.testing.assert_allclose(
            np.asarray(ss), (v32 ** 2).reshape(m, -1, cfg.block_n).sum(axis=2).T, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(ss), np.asarray(want_ss), rtol=3e-2)


class TestGemmAllReduceInterpret(TestGemmAllReduce):
    INTERPRET = True


def test_rejects_bad_inputs():
    x, w, residual = _inputs(4, 128, 64)
    one, cfg = jnp.zeros((1,), jnp.int32), Cfg(block_n=32, block_k=64, num_splits=1)
    with pytest.raises(ValueError, match="num_splits=2"):
        gemm_all_reduce(x, w, residual, one, one, config=Cfg(32, 32, 2), interpret=True)
    with pytest.raises(ValueError, match=r"residual \(4, 32\)"):
        gemm_all_reduce(x, w, residual[:, :32], one, one, config=cfg, interpret=True)
    big = jnp.zeros((17, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"x \(17, 128\)"):
        gemm_all_reduce(big, w, jnp.zeros((17, 64), jnp.bfloat16), one, one, config=cfg,
                        interpret=True)
    with pytest.raises(ValueError, match="interpret"):
        gemm_all_reduce(x, w, residual, one, one, config=cfg, interpret=True,
                        exchange=Exchange((1 << 40, 1 << 41)))
    with pytest.raises(ValueError, match="16-byte aligned"):
        Exchange((1 << 40, 3))
