"""Skinny GEMM (decode-sized projections): the Pallas kernels (split-K partials; gate/up with
SwiGLU's activation) vs their references, and the dispatcher.

`TestSkinnyGemm` (INTERPRET = False) runs compiled on a GPU and skips elsewhere;
`TestSkinnyGemmInterpret` runs the same cases through the Pallas interpreter on CPU (CI).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_modes import CompiledOrInterpreted
from xlaserve.pallas_kernels import ops
from xlaserve.pallas_kernels.skinny_gemm import (
    SkinnyGemmConfig,
    skinny_gemm,
    skinny_gemm_reference,
    skinny_gemm_swiglu,
    skinny_gemm_swiglu_reference,
)

Cfg = SkinnyGemmConfig

# (M, K, widths of the weights, config): one weight and several (q/k/v-like: one wide, two
# narrow); M below, at and above the 16-row alignment; 1 to 8 splits.
CASES = [
    (1, 256, (64,), Cfg(block_n=32, block_k=64, num_splits=2, num_stages=2)),
    (16, 256, (128, 32, 32), Cfg(block_n=32, block_k=32, num_splits=4, num_stages=3)),
    (5, 512, (64, 64), Cfg(block_n=64, block_k=64, num_splits=8)),
    (20, 128, (16, 48), Cfg(block_n=16, block_k=128, num_splits=1, num_warps=8)),
]


def _case_id(case) -> str:
    m, k, ns, cfg = case
    return (f"M{m}-K{k}-N{'+'.join(map(str, ns))}-bn{cfg.block_n}-bk{cfg.block_k}"
            f"-s{cfg.num_splits}")


def _inputs(m, k, ns, dtype, seed=0):
    key = jax.random.key(seed)
    x = jax.random.normal(key, (m, k), jnp.float32).astype(dtype)
    ws = tuple((jax.random.normal(jax.random.fold_in(key, i + 1), (k, n), jnp.float32) * 0.05)
               .astype(dtype) for i, n in enumerate(ns))
    return x, ws


class TestSkinnyGemm(CompiledOrInterpreted):
    """Compiled kernel vs reference; skips without a GPU. The subclass interprets on CPU."""

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize("case", CASES, ids=_case_id)
    def test_matches_reference(self, case, dtype):
        m, k, ns, cfg = case
        x, ws = _inputs(m, k, ns, dtype)
        out = skinny_gemm(x, ws, config=cfg, interpret=self.INTERPRET)
        ref = skinny_gemm_reference(x, ws, num_splits=cfg.num_splits)
        assert out.shape == (cfg.num_splits, m, sum(ns)) and out.dtype == jnp.float32
        # float32 inputs on a GPU: the kernel's and the reference's dots may round to TF32 (the
        # interpreter's too: it runs the dots on the GPU); bf16 products are exact in float32
        tol = 2e-2 if (dtype == jnp.float32 and jax.default_backend() == "gpu") else 1e-4
        scale = float(jnp.max(jnp.abs(ref)))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=tol, atol=tol * scale)
        # the partials sum to the product of x with the weights side by side
        full = jnp.concatenate([x.astype(jnp.float32) @ w.astype(jnp.float32) for w in ws], 1)
        np.testing.assert_allclose(np.asarray(out.sum(0)), np.asarray(full), rtol=tol,
                                   atol=tol * scale)

    def test_model_shapes_bf16(self):
        """The 8B model's q/k/v at tp=2 ([16, 4096] x [4096, 2048 + 512 + 512]) with the
        table's tiles: relative error of the summed product below 1e-2."""
        if self.INTERPRET:
            pytest.skip("the interpreter takes minutes at this size; CASES cover the logic")
        x, ws = _inputs(16, 4096, (2048, 512, 512), jnp.bfloat16)
        cfg = ops.skinny_gemm_config(16, 4096, (2048, 512, 512), jnp.bfloat16, "auto")
        assert cfg is not None
        got = skinny_gemm(x, ws, config=cfg).sum(0)
        want = skinny_gemm_reference(x, ws, num_splits=1)[0]
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        assert err < 1e-2, err


    # (M, K, I, config) of the gated kernel: rows below, at and above the 16-row alignment
    SWIGLU_CASES = [(1, 256, 64, Cfg(block_n=32, block_k=64, num_splits=1)),
                    (16, 128, 96, Cfg(block_n=32, block_k=32, num_splits=1, num_stages=2)),
                    (20, 512, 128, Cfg(block_n=64, block_k=128, num_splits=1, num_warps=8,
                                       num_stages=2))]  # f32 at 4 stages: > 227 KiB smem

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize("case", SWIGLU_CASES,
                             ids=lambda c: f"M{c[0]}-K{c[1]}-I{c[2]}-bn{c[3].block_n}")
    def test_swiglu_matches_reference(self, case, dtype):
        """silu(x @ gate) * (x @ up) in x's dtype; gate and up differ (0.3 vs 0.05 scale), so
        an activation applied to the wrong product shows."""
        m, k, i, cfg = case
        key = jax.random.key(3)
        x = jax.random.normal(key, (m, k), jnp.float32).astype(dtype)
        gate, up = ((jax.random.normal(jax.random.fold_in(key, j), (k, i), jnp.float32) * sc)
                    .astype(dtype) for j, sc in ((1, 0.3), (2, 0.05)))
        out = skinny_gemm_swiglu(x, gate, up, config=cfg, interpret=self.INTERPRET)
        ref = skinny_gemm_swiglu_reference(x, gate, up)
        assert out.shape == (m, i) and out.dtype == dtype
        # bf16: the kernel's and the reference's float32 sums may round to neighbouring bf16
        # values before the activation; float32 on a GPU: TF32 dots
        tol = (2e-2 if dtype == jnp.bfloat16 or jax.default_backend() == "gpu" else 1e-4)
        scale = float(jnp.max(jnp.abs(ref.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                                   rtol=tol, atol=tol * scale)
        if dtype == jnp.bfloat16:  # and almost every element is the same bf16 value
            same = float(jnp.mean((out == ref).astype(jnp.float32)))
            assert same > 0.9, same

    def test_swiglu_model_shape_bf16(self):
        """The 8B model's gate/up at tp=2 ([16, 4096] x 2 x [4096, 7168]) with the table's
        tiles (or the default where the table has none)."""
        if self.INTERPRET:
            pytest.skip("the interpreter takes minutes at this size; the cases cover the logic")
        key = jax.random.key(4)
        x = jax.random.normal(key, (16, 4096), jnp.float32).astype(jnp.bfloat16)
        gate, up = ((jax.random.normal(jax.random.fold_in(key, j), (4096, 7168), jnp.float32)
                     * 0.02).astype(jnp.bfloat16) for j in (1, 2))
        cfg = ops.skinny_gemm_config(16, 4096, (7168, 7168), jnp.bfloat16, "pallas",
                                     epilogue="swiglu")
        assert cfg is not None and cfg.num_splits == 1
        got = skinny_gemm_swiglu(x, gate, up, config=cfg).astype(jnp.float32)
        want = skinny_gemm_swiglu_reference(x, gate, up).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        assert err < 2e-2, err


class TestSkinnyGemmInterpret(TestSkinnyGemm):
    """The same tests through the Pallas interpreter: runs on CPU in CI."""

    INTERPRET = True


def test_rejects_bad_shapes_and_tiles():
    x, ws = _inputs(4, 256, (64,), jnp.float32)
    with pytest.raises(ValueError, match="block_n"):
        skinny_gemm(x, ws, config=Cfg(block_n=128, block_k=64, num_splits=1), interpret=True)
    with pytest.raises(ValueError, match="num_splits"):
        skinny_gemm(x, ws, config=Cfg(block_k=128, num_splits=4), interpret=True)
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        skinny_gemm(x, (ws[0].astype(jnp.bfloat16),), interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        Cfg(block_n=48)
    with pytest.raises(ValueError, match="num_warps"):
        Cfg(num_warps=0)


def test_swiglu_rejects_bad_inputs():
    x, (g,) = _inputs(4, 256, (64,), jnp.float32)
    with pytest.raises(ValueError, match="num_splits=2"):
        skinny_gemm_swiglu(x, g, g, config=Cfg(block_n=32, block_k=64, num_splits=2),
                           interpret=True)
    with pytest.raises(ValueError, match="gate, up"):
        skinny_gemm_swiglu(x, g, g[:, :32], config=Cfg(num_splits=1), interpret=True)
    with pytest.raises(ValueError, match="block_n"):
        skinny_gemm_swiglu(x, g, g, config=Cfg(block_n=128, block_k=64, num_splits=1),
                           interpret=True)


def test_dispatcher_swiglu_epilogue():
    """The gated kernel's tiles: its own table entries (one split), never the plain entries
    of the same shape; the default tiles have one split; an unknown epilogue is an error."""
    max_rows, table = ops.skinny_gemm_table()
    for (k, n, dt, epi), cfg in table.items():
        if epi == "swiglu":
            assert ops.skinny_gemm_config(16, k, (n // 2, n // 2), dt, "auto", "gpu",
                                          epilogue="swiglu") == cfg
    qkv = (16, 4096, (2048, 512, 512), jnp.bfloat16)
    assert ops.skinny_gemm_config(16, 4096, (1536, 1536), jnp.bfloat16, "auto", "gpu",
                                  epilogue="swiglu") is None  # (4096, 3072): a plain entry
    assert ops.skinny_gemm_config(*qkv, "auto", "gpu") is not None
    cfg = ops.skinny_gemm_config(16, 256, (64, 64), jnp.float32, "pallas_interpret", "cpu",
                                 epilogue="swiglu")
    assert cfg is not None and cfg.num_splits == 1
    assert ops.skinny_gemm_config(max_rows + 1, 256, (64, 64), jnp.float32, "pallas_interpret",
                                  "cpu", epilogue="swiglu") is None
    with pytest.raises(ValueError, match="epilogue"):
        ops.skinny_gemm_config(*qkv, "auto", "gpu", epilogue="gelu")


def test_dispatcher_modes():
    """auto: the table's shapes on GPU only (rows up to its max); pallas: any dividing shape,
    GPU only; pallas_interpret anywhere; xla never; an unknown mode is an error."""
    qkv = (16, 4096, (2048, 512, 512), jnp.bfloat16)
    assert ops.skinny_gemm_config(*qkv, "auto", "gpu") == Cfg(block_n=32, block_k=128,
                                                              num_splits=4)
    assert ops.skinny_gemm_config(*qkv, "auto", "cpu") is None
    assert ops.skinny_gemm_config(*qkv, "xla", "gpu") is None
    assert ops.skinny_gemm_config(64, *qkv[1:], "auto", "gpu") is None  # past max_rows
    assert ops.skinny_gemm_config(16, 4096, (4096,), jnp.bfloat16, "auto", "gpu") is None
    # a table entry whose block_n does not divide these widths is not used
    assert ops.skinny_gemm_config(16, 4096, (3056, 16), jnp.bfloat16, "auto", "gpu") is None
    cfg = ops.skinny_gemm_config(16, 64, (32, 16), jnp.float32, "pallas_interpret", "cpu")
    assert cfg is not None and cfg.fits(64, (32, 16)) is None
    with pytest.raises(RuntimeError, match="GPU"):
        ops.skinny_gemm_config(*qkv, "pallas", "cpu")
    with pytest.raises(ValueError, match="mode"):
        ops.skinny_gemm_config(*qkv, "triton", "gpu")
    with pytest.raises(ValueError, match="no tile"):
        ops.skinny_gemm_config(16, 64, (24,), jnp.float32, "pallas_interpret", "cpu")
    # more rows than the table's max_rows: XLA's GEMM in every mode (a 1024-row tile overflowed
    # an H200's shared memory through the CLI's --decode-gemm pallas)
    for mode in ("pallas", "pallas_interpret"):
        assert ops.skinny_gemm_config(1024, *qkv[1:], mode, "gpu") is None


def test_table_entries_fit_their_shapes():
    """Every entry of the measured table divides its own shape (a typo would never be used)."""
    max_rows, table = ops.skinny_gemm_table()
    assert max_rows >= 1 and table
    for (k, n, _, epilogue), cfg in table.items():
        assert cfg.fits(k, (n,)) is None, (k, n, cfg)
        assert epilogue in ops.EPILOGUES and (not epilogue or cfg.num_splits == 1), epilogue
