"""o_proj's skinny GEMM reading attention's uncombined flash-decoding splits
(`skinny_gemm_combine`) vs combine-then-GEMM in pure jnp, on random partials (splits without
keys, padding rows, padded GQA groups) and on the attention kernel's own deferred output.

`TestSkinnyGemmCombine` runs compiled on a GPU and skips elsewhere; the Interpret subclass runs
the same cases through the Pallas interpreter on CPU (CI).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_modes import CompiledOrInterpreted
from xlaserve.pallas_kernels import ragged_paged_attention as rpa
from xlaserve.pallas_kernels.ragged_paged_attention import SplitAttention
from xlaserve.pallas_kernels.skinny_gemm import (
    SkinnyGemmConfig,
    combine_fits,
    skinny_gemm_combine,
    skinny_gemm_combine_reference,
)

Cfg = SkinnyGemmConfig

# (T, KV heads, group, padded group, H, KV splits, N out, rows, tiles)
CASES = [
    (16, 2, 4, 4, 16, 4, 64, 1, Cfg(block_n=32, num_splits=2)),  # batch 1 in a 16-row bucket
    (5, 2, 3, 4, 16, 2, 32, 4, Cfg(block_n=16, num_splits=3)),  # G 3 padded to 4, T < 16
    (20, 1, 2, 2, 32, 8, 64, 20, Cfg(block_n=64, num_splits=1, num_stages=2)),  # all rows real
]


def _case_id(case) -> str:
    t, k, g, gp, h, sp, n, rows, cfg = case
    return f"T{t}-K{k}-G{g}of{gp}-H{h}-sp{sp}-N{n}-rows{rows}-s{cfg.num_splits}"


def _split_attention(t, k, g, gp, h, sp, dtype, seed=0) -> SplitAttention:
    """Random partials as the kernel leaves them: a split without keys has m = -inf, l = 0 and
    o = 0 (one whole split of one head, and every split of one row)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    n_cols = k * gp
    m = jax.random.normal(keys[0], (sp, t, n_cols), jnp.float32) * 4
    m = m.at[sp - 1, :, 1].set(-jnp.inf).at[:, min(2, t - 1), :].set(-jnp.inf)
    empty = m == -jnp.inf
    l = jnp.where(empty, 0.0, jax.random.uniform(keys[1], m.shape, jnp.float32, 0.5, 3.0))
    o = jnp.where(empty[..., None], 0.0,
                  jax.random.normal(keys[2], (sp, t, n_cols, h), jnp.float32))
    return SplitAttention(o, m, l, group=g, padded_group=gp, dtype=jnp.dtype(dtype).name)


class TestSkinnyGemmCombine(CompiledOrInterpreted):
    """Compiled kernel vs reference; skips without a GPU. The subclass interprets on CPU."""

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize("case", CASES, ids=_case_id)
    def test_matches_reference(self, case, dtype):
        t, k, g, gp, h, sp, n, rows, cfg = case
        x = _split_attention(t, k, g, gp, h, sp, dtype)
        w = (jax.random.normal(jax.random.key(7), (k * g * h, n), jnp.float32) * 0.05
             ).astype(dtype)
        r = jnp.array([rows], jnp.int32)
        out = skinny_gemm_combine(x, w, r, config=cfg, interpret=self.INTERPRET)
        ref = skinny_gemm_combine_reference(x, w, r, num_splits=cfg.num_splits)
        assert out.shape == (cfg.num_splits, t, n) and out.dtype == jnp.float32
        tol = 2e-2 if (dtype == jnp.float32 and jax.default_backend() == "gpu") else 1e-4
        scale = float(jnp.max(jnp.abs(ref)))
        assert scale > 0
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=tol, atol=tol * scale)
        # padding rows (from `rows` on) give exactly zero partials
        assert not np.any(np.asarray(out[:, rows:]))

    def test_attention_kernel_output(self):
        """The attention kernel's deferred splits (a ragged decode batch over permuted pages)
        through the GEMM equal its combined output through a plain product."""
        dtype, h, k, g, page_size, pages = jnp.bfloat16, 16, 2, 4, 16, 64
        kv_lens = np.array([37, 1, 200, 0], np.int32)
        num_seqs, t = 3, 16
        rng = np.random.default_rng(0)
        perm = rng.permutation(np.arange(1, pages)).astype(np.int32)
        table = np.zeros((4, 16), np.int32)
        used = 0
        for s, n in enumerate(kv_lens[:num_seqs]):
            count = -(-int(n) // page_size)
            table[s, :count] = perm[used:used + count]
            used += count
        cu = np.array([0, 1, 2, 3, 3], np.int32)
        keys = jax.random.split(jax.random.key(1), 4)
        q = jax.random.normal(keys[0], (t, k * g, h), jnp.float32).astype(dtype)
        kp = jax.random.normal(keys[1], (k, pages, page_size, h), jnp.float32).astype(dtype)
        vp = jax.random.normal(keys[2], (k, pages, page_size, h), jnp.float32).astype(dtype)
        config = rpa.RaggedPagedAttentionConfig(block_q=4, pages_per_block=2, num_splits=4,
                                                key_gather=True)
        args = (q, kp, vp, jnp.asarray(kv_lens), jnp.asarray(table), jnp.asarray(cu),
                jnp.array([num_seqs], jnp.int32))
        kw = dict(sm_scale=h ** -0.5, config=config, interpret=self.INTERPRET)
        split = rpa.ragged_paged_attention(*args, defer_combine=True, **kw)
        assert isinstance(split, SplitAttention) and split.shape == q.shape
        plain = rpa.ragged_paged_attention(*args, **kw)
        np.testing.assert_array_equal(np.asarray(split.combine(), np.float32),
                                      np.asarray(plain, np.float32))
        w = (jax.random.normal(keys[3], (k * g * h, 64), jnp.float32) * 0.05).astype(dtype)
        rows = jnp.array([num_seqs], jnp.int32)
        out = skinny_gemm_combine(split, w, rows, config=Cfg(block_n=32, num_splits=2),
                                  interpret=self.INTERPRET).sum(0)
        want = plain.reshape(t, -1).astype(jnp.float32) @ w.astype(jnp.float32)
        want = want.at[num_seqs:].set(0.0)
        err = float(jnp.max(jnp.abs(out - want)) / jnp.max(jnp.abs(want)))
        assert err < 1e-2, err


class TestSkinnyGemmCombineInterpret(TestSkinnyGemmCombine):
    """The same tests through the Pallas interpreter: runs on CPU in CI."""

    INTERPRET = True


def test_rejects_what_does_not_fit():
    x = _split_attention(16, 2, 4, 4, 16, 2, jnp.float32)
    w = jnp.zeros((128, 64), jnp.float32)
    assert combine_fits(x, w.shape, Cfg(block_n=32, num_splits=2)) is None
    assert "K = N * H" in combine_fits(x, (96, 64), Cfg())
    assert "num_splits=3" in combine_fits(x, w.shape, Cfg(num_splits=3))
    assert "block_n=128" in combine_fits(x, w.shape, Cfg(block_n=128))
    small = _split_attention(16, 2, 4, 4, 8, 2, jnp.float32)
    assert "head dim H=8" in combine_fits(small, (64, 64), Cfg())
    with pytest.raises(ValueError, match="skinny_gemm_combine.*num_splits=3"):
        skinny_gemm_combine(x, w, config=Cfg(num_splits=3), interpret=True)
    with pytest.raises(ValueError, match="dtype"):
        skinny_gemm_combine(x, w.astype(jnp.bfloat16), config=Cfg(), interpret=True)


def test_defers_only_split_direct_tiles():
    """defer_combine returns splits only for a split KV range over direct q tiles; otherwise
    the plain output, so a caller can always pass it."""
    assert rpa.defers_combine(rpa.RaggedPagedAttentionConfig(num_splits=4))
    assert not rpa.defers_combine(rpa.RaggedPagedAttentionConfig(num_splits=1))
    assert not rpa.defers_combine(rpa.RaggedPagedAttentionConfig(num_splits=4,
                                                                 q_transposed=True))
