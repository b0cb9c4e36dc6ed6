"""L2 prefetch hints (pallas_kernels/l2_prefetch.py): the pieces cover the operand once, the
attention kernel carries the instruction only where enabled, the model hands it o_proj's
weight, and (on a GPU of compute capability >= 9.0) the hinted kernel computes what the plain
one does.

The lowering tests run anywhere: jax lowers the Pallas Triton kernels for "cuda" on the CPU
too, and the Triton module (with the inline asm's text) sits in the custom call's config.
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.pallas_kernels import l2_prefetch, pdl
from xlaserve.pallas_kernels import ragged_paged_attention as rpa
from xlaserve.runtime.models import llama
from xlaserve.runtime.config import ModelConfig

from tests.kernels.test_pdl import _cuda_text

BF16 = jnp.bfloat16
SDS = jax.ShapeDtypeStruct
I32 = jnp.int32
ATTENTION_SPECS = [SDS((4, 8, 64), BF16), SDS((2, 8, 16, 64), BF16), SDS((2, 8, 16, 64), BF16),
                   SDS((2,), I32), SDS((2, 4), I32), SDS((3,), I32), SDS((1,), I32),
                   SDS((8, 64, 512), BF16)]
INSTRUCTION = "cp.async.bulk.prefetch.L2.global"


def _attention(q, kp, vp, kv_lens, table, cu, n, w):
    return rpa.ragged_paged_attention(q, kp, vp, kv_lens, table, cu, n, sm_scale=0.125,
                                      prefetch=w)


@pytest.mark.parametrize("total,programs,threads", [
    (16, 1, 128), (2048 * 4096 * 2, 192, 128), (16 * 1001, 7, 64), (4096 * 32, 3, 32),
    (16 * 5, 4, 32)])
def test_pieces_cover_the_operand_once(total, programs, threads):
    cover = np.zeros(total // 16, np.int32)
    for program in range(programs):
        start, size = map(np.asarray, l2_prefetch.pieces(jnp.int32(program), programs,
                                                         threads, total))
        assert np.all(start % 16 == 0) and np.all(size % 16 == 0)
        assert np.all(start + size <= total) and np.all(size >= 0)
        for a, z in zip(start, size):
            cover[a // 16:(a + z) // 16] += 1
    np.testing.assert_array_equal(cover, 1)


@pytest.mark.parametrize("site", l2_prefetch.SITES)
def test_attention_prefetches_only_where_enabled(site, monkeypatch):
    with mock.patch.object(pdl, "unsupported", lambda: None):  # as on an H100 / H200
        monkeypatch.setenv(l2_prefetch.ENV, site)
        on = _cuda_text(_attention, ATTENTION_SPECS)
        monkeypatch.delenv(l2_prefetch.ENV)
        off = _cuda_text(_attention, ATTENTION_SPECS)
    with mock.patch.object(pdl, "unsupported", lambda: "compute capability 8.0 < 9.0"):
        monkeypatch.setenv(l2_prefetch.ENV, "1")
        old = _cuda_text(_attention, ATTENTION_SPECS)
    assert on.count(INSTRUCTION) == 1 and "ragged_paged_attention_bq" in on
    assert "_pf" in on and "_pf" not in off
    for text in (off, old):
        assert "__gpu$xla.gpu.triton" in text and INSTRUCTION not in text


def test_sites(monkeypatch):
    monkeypatch.delenv(l2_prefetch.ENV, raising=False)
    assert l2_prefetch.sites() == l2_prefetch.DEFAULT_SITES
    monkeypatch.setenv(l2_prefetch.ENV, "1")
    assert l2_prefetch.sites() == l2_prefetch.SITES
    monkeypatch.setenv(l2_prefetch.ENV, "0")
    assert l2_prefetch.sites() == ()
    assert not l2_prefetch.enabled(False, "attention")
    monkeypatch.setenv(l2_prefetch.ENV, "attention,bogus")
    with pytest.raises(ValueError, match="bogus"):
        l2_prefetch.sites()
    with pytest.raises(ValueError, match="site='nope'"):
        l2_prefetch.enabled(False, "nope")
    monkeypatch.setenv(l2_prefetch.ENV, "1")
    assert not l2_prefetch.enabled(True, "attention")  # never when interpreted
    with mock.patch.object(pdl, "unsupported", lambda: None):
        assert l2_prefetch.enabled(False, "attention")
        assert "attention" in l2_prefetch.describe()


def test_model_hands_attention_its_o_proj_weight():
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=128, dtype="float32")
    params = llama.init_params(cfg, jax.random.key(0))
    seen = []

    def attention_fn(q, k_new, v_new, k_pages, v_pages, inputs, *, sm_scale, sliding_window,
                     prefetch=None):
        seen.append(prefetch)
        return llama.paged_attention(q, k_new, v_new, k_pages, v_pages, inputs,
                                     sm_scale=sm_scale, sliding_window=sliding_window,
                                     impl="reference")

    inputs, cache = llama._dummy_step(cfg)
    llama.forward(params, inputs, cache, cfg, attention_fn=attention_fn)
    kernels = [params["layers_0"]["attn"]["o_proj"]["kernel"],
               params["layers_1"]["attn"]["o_proj"]["kernel"]]
    assert len(seen) == 2
    for got, want in zip(seen, kernels):
        assert got is not None and got.shape == (4, 8, 32)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _gpu_sm90() -> bool:
    return jax.default_backend() == "gpu" and pdl.unsupported() is None


@pytest.mark.skipif(not _gpu_sm90(), reason="needs a GPU of compute capability >= 9.0")
@pytest.mark.parametrize("site", l2_prefetch.SITES)
def test_compiled_attention_with_prefetch_equals_without(site, monkeypatch):
    """The 8B decode shape at tp 2 (4 KV heads, group 4, 1 sequence of 1025 keys), o_proj's
    local weight [16, 128, 4096] as the hint: the outputs are bit-equal."""
    rng = np.random.default_rng(0)
    k, p, page, h, n = 4, 80, 16, 128, 16
    q = jnp.asarray(rng.standard_normal((16, n, h)), BF16)
    kp = jnp.asarray(rng.standard_normal((k, p, page, h)), BF16)
    vp = jnp.asarray(rng.standard_normal((k, p, page, h)), BF16)
    kv_lens = jnp.array([1025], I32)
    table = jnp.asarray(rng.permutation(np.arange(1, p))[:65][None], I32)
    cu = jnp.array([0, 1], I32)
    num = jnp.array([1], I32)
    w = jnp.asarray(rng.standard_normal((n, h, 4096)), BF16)
    args = (q, kp, vp, kv_lens, table, cu, num)
    monkeypatch.setenv(l2_prefetch.ENV, "0")
    jax.clear_caches()
    plain = jax.jit(_attention)(*args, w)
    monkeypatch.setenv(l2_prefetch.ENV, site)
    jax.clear_caches()
    fn = jax.jit(_attention)
    assert INSTRUCTION in fn.lower(*args, w).as_text()
    hinted = fn(*args, w)
    ref = rpa.ragged_paged_attention_reference(*args, sm_scale=0.125)
    np.testing.assert_array_equal(np.asarray(hinted[:1], np.float32),
                                  np.asarray(plain[:1], np.float32))
    np.testing.assert_allclose(np.asarray(hinted[:1], np.float32),
                               np.asarray(ref[:1], np.float32), atol=2e-2, rtol=2e-2)
