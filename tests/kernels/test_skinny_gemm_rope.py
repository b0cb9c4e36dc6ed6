"""skinny_gemm_rope (q/k/v GEMM with rope and the K/V write as its epilogue): the Pallas kernel vs
its reference (the one-split skinny GEMM, then rope_write_kv's reference) and vs the two kernels
it replaces; its Triton module lowered for CUDA and verified.

`TestSkinnyGemmRope` (INTERPRET = False) runs compiled on a GPU and skips elsewhere;
`TestSkinnyGemmRopeInterpret` runs the same cases through the Pallas interpreter on CPU (CI).
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_modes import CompiledOrInterpreted
from xlaserve.pallas_kernels.rope_write_kv import rope_write_kv
from xlaserve.pallas_kernels.skinny_gemm import SkinnyGemmConfig, skinny_gemm
from xlaserve.pallas_kernels.skinny_gemm_rope import (
    skinny_gemm_rope,
    skinny_gemm_rope_reference,
)
from xlaserve.runtime.config import RopeScaling
from xlaserve.runtime.models.layers import rope_inv_freq, rope_tables

# (tokens M, real rows, K, q heads N, KV heads K', head dim H, pages P, page size L, hb)
CASES = [
    (16, 1, 256, 8, 2, 64, 6, 16, 16),  # batch-1 decode: 1 real row of the T16 bucket, G 4
    (16, 16, 128, 4, 4, 32, 5, 8, 16),  # every row real, G 1, one half-tile per head
    (5, 3, 256, 8, 1, 64, 4, 16, 32),  # M not a multiple of 16, G 8, hb 32
]


def _case_id(case) -> str:
    m, r, k, n, kv, h, _, page, hb = case
    return f"M{m}-R{r}-K{k}-N{n}-KV{kv}-H{h}-L{page}-hb{hb}"


def _inputs(case, dtype, seed=0):
    m, r, k, n, kv, h, p, page, _ = case
    key = jax.random.key(seed)
    x = jax.random.normal(key, (m, k)).astype(dtype)
    ws = [(jax.random.normal(jax.random.fold_in(key, i), (k, heads * h)) / np.sqrt(k)).astype(
        dtype) for i, heads in enumerate((n, kv, kv), start=1)]
    positions = jax.random.randint(jax.random.fold_in(key, 5), (m,), 0, 4096).astype(jnp.int32)
    cos, sin = rope_tables(positions, rope_inv_freq(h, 500000.0, RopeScaling()))
    slots = jnp.asarray(np.random.RandomState(seed).permutation(p * page)[:m], jnp.int32)
    k_pages = jax.random.normal(jax.random.fold_in(key, 6), (kv, p, page, h)).astype(dtype)
    v_pages = jax.random.normal(jax.random.fold_in(key, 7), (kv, p, page, h)).astype(dtype)
    return x, ws, cos, sin, slots, k_pages, v_pages, jnp.array([r], jnp.int32)


def _tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)


def _f32(a):
    return np.asarray(jnp.asarray(a, jnp.float32))


def _config(case):
    return SkinnyGemmConfig(block_n=case[-1], block_k=64, num_splits=1)


class TestSkinnyGemmRope(CompiledOrInterpreted):
    """Compiled kernel vs reference; skips without a GPU. The subclass interprets on CPU."""

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize("case", CASES, ids=_case_id)
    def test_matches_reference(self, case, dtype):
        """q (zero on padding rows) and both pools: the real rows' slots hold the new K/V, every
        other slot keeps its contents bit for bit."""
        x, ws, cos, sin, slots, k_pages, v_pages, rows = _inputs(case, dtype)
        want = skinny_gemm_rope_reference(x, *ws, cos, sin, slots, k_pages, v_pages, rows)
        got = skinny_gemm_rope(x, *ws, cos, sin, slots, k_pages, v_pages, rows,
                               config=_config(case), interpret=self.INTERPRET)
        m, r, _, n, kv, h, p, page, _ = case
        assert got[0].shape == (m, n, h) and got[0].dtype == dtype
        assert (_f32(got[0])[r:] == 0).all()
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(_f32(g), _f32(w), **_tol(dtype))
        untouched = np.setdiff1d(np.arange(p * page), np.asarray(slots)[:r])
        for g, before in ((got[1], k_pages), (got[2], v_pages)):
            np.testing.assert_array_equal(
                _f32(g).reshape(kv, p * page, h)[:, untouched],
                _f32(before).reshape(kv, p * page, h)[:, untouched])
        assert not np.array_equal(_f32(got[1]), _f32(k_pages))  # the real rows were stored

    @pytest.mark.parametrize("case", CASES[:1], ids=_case_id)
    def test_matches_the_two_kernels_it_replaces(self, case):
        """Against skinny_gemm (one split) then rope_write_kv, the model's path today."""
        x, ws, cos, sin, slots, k_pages, v_pages, rows = _inputs(case, jnp.bfloat16, seed=3)
        cfg = _config(case)
        parts = skinny_gemm(x, tuple(ws), config=SkinnyGemmConfig(
            block_n=16, block_k=64, num_splits=1), interpret=self.INTERPRET)
        want = rope_write_kv(parts, cos, sin, slots, k_pages, v_pages, rows,
                             num_q_heads=case[3], dtype=jnp.bfloat16, interpret=self.INTERPRET)
        got = skinny_gemm_rope(x, *ws, cos, sin, slots, k_pages, v_pages, rows, config=cfg,
                               interpret=self.INTERPRET)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(_f32(g), _f32(w), rtol=1e-2, atol=1e-2)

    def test_rejects_bad_shapes(self):
        case = CASES[0]
        x, ws, cos, sin, slots, k_pages, v_pages, rows = _inputs(case, jnp.float32)
        cfg = _config(case)
        with pytest.raises(ValueError, match="wk"):
            skinny_gemm_rope(x, ws[0], ws[1][:, :-64], ws[2], cos, sin, slots, k_pages,
                             v_pages, rows, config=cfg, interpret=True)
        with pytest.raises(ValueError, match="cos"):
            skinny_gemm_rope(x, *ws, cos[:, :8], sin, slots, k_pages, v_pages, rows,
                             config=cfg, interpret=True)
        with pytest.raises(ValueError, match="num_splits 1"):
            skinny_gemm_rope(x, *ws, cos, sin, slots, k_pages, v_pages, rows,
                             config=SkinnyGemmConfig(block_n=16, num_splits=2), interpret=True)
        with pytest.raises(ValueError, match="slot_mapping"):
            skinny_gemm_rope(x, *ws, cos, sin, slots[:-1], k_pages, v_pages, rows,
                             config=cfg, interpret=True)


class TestSkinnyGemmRopeInterpret(TestSkinnyGemmRope):
    INTERPRET = True


def test_lowers_to_a_verified_triton_module():
    """The 8B q/k/v shape at tp 2 lowered for CUDA on the CPU: one Triton custom call whose
    module passes its dialects' verifiers (what XLA's parser checks on the GPU)."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module
    verified = []

    def checked(*args, **kwargs):
        result = lower(*args, **kwargs)
        assert result.module.operation.verify()
        verified.append(result)
        return result

    bf = jnp.bfloat16
    specs = (jax.ShapeDtypeStruct((16, 4096), bf), jax.ShapeDtypeStruct((4096, 2048), bf),
             jax.ShapeDtypeStruct((4096, 512), bf), jax.ShapeDtypeStruct((4096, 512), bf),
             jax.ShapeDtypeStruct((16, 64), jnp.float32),
             jax.ShapeDtypeStruct((16, 64), jnp.float32), jax.ShapeDtypeStruct((16,), jnp.int32),
             jax.ShapeDtypeStruct((4, 64, 16, 128), bf), jax.ShapeDtypeStruct((4, 64, 16, 128), bf),
             jax.ShapeDtypeStruct((1,), jnp.int32))

    def fn(*args):
        return skinny_gemm_rope(*args, config=SkinnyGemmConfig(block_n=16, block_k=128,
                                                               num_splits=1))

    with mock.patch.object(registration.lowering, "lower_jaxpr_to_triton_module", checked):
        text = jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1 and len(verified) == 1
    assert "skinny_gemm_rope_k4096_n16_kv4" in text
