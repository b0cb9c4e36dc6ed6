"""The ragged, paged forward equals a plain dense causal forward, sequence by sequence.

A batch of several sequences with ragged lengths (1, L-1, L, L+1, 2L+1) and shuffled,
non-contiguous pages runs in two steps (chunked prefill, then the rest plus a decode token); each
row's hidden state and each sequence's logits must equal a dense per-sequence forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from paged_helpers import PagedSeq, build_step, dense_hidden, permuted_pages

from xlaserve.runtime.config import ModelConfig, RopeScaling
from xlaserve.runtime.models import llama

_BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=8, max_position_embeddings=128, dtype="float32")
CONFIGS = {
    "qwen3_like": ModelConfig(model_type="qwen3", qk_norm=True, attention_bias=True, **_BASE),
    "mistral_like": ModelConfig(model_type="mistral", sliding_window=5, **_BASE),
    "llama3_like": ModelConfig(model_type="llama", tie_word_embeddings=True,
                               rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16), **_BASE),
}
PAGE_SIZE = 4


def random_params(cfg: ModelConfig, seed: int) -> llama.Params:
    # Scale the 0.02-std init up so attention weights are far from uniform.
    params = jax.jit(functools.partial(llama.init_params, cfg))(jax.random.key(seed))
    return jax.tree.map(lambda x: x * 6.0, params)


def _hidden_and_forward(params, step, cache, cfg):
    """All rows' hidden states (no cache update) and the real forward step, in one program."""
    hidden, _ = llama.forward_hidden(params, step, cache, cfg, attention_impl="reference")
    return (hidden, *llama.forward(params, step, cache, cfg, attention_impl="reference"))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ragged_paged_batch_equals_dense(name: str) -> None:
    cfg = CONFIGS[name]
    params = random_params(cfg, seed=1)
    rng = np.random.RandomState(0)
    lengths = [1, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1, 2 * PAGE_SIZE + 1]
    tokens = [list(rng.randint(0, cfg.vocab_size, size=n + 1)) for n in lengths]  # +1: decode
    max_pages = 3
    pages = permuted_pages(rng, 24, [max_pages] * len(lengths))
    seqs = [PagedSeq(p) for p in pages]
    cache = llama.init_kv_cache(cfg, 24, PAGE_SIZE)
    step_fn = jax.jit(_hidden_and_forward, static_argnames=("cfg",))
    # Causal attention: a row never sees later tokens, so pad every sequence to one length and
    # run one compiled dense forward for all of them.
    longest = max(len(t) for t in tokens)
    dense = [np.asarray(dense_hidden(params, cfg, t + [0] * (longest - len(t))))[:len(t)]
             for t in tokens]
    dense_logits = [np.asarray(llama.compute_logits(params, jnp.asarray(d), cfg)) for d in dense]
    scale = max(float(np.abs(d).max()) for d in dense_logits)

    # Step 1: chunked prefill (some sequences get only part of their prompt).
    chunk1 = [1, 3, 4, 2, 6]
    step_a = build_step(seqs, [t[:c] for t, c in zip(tokens, chunk1)], page_size=PAGE_SIZE,
                        t_pad=32, s_pad=8, max_pages=max_pages)
    # Step 2: the rest of each prompt plus one decode token (first 3 sequences: decode only).
    rest = [t[c:] for t, c in zip(tokens, chunk1)]
    step_b = build_step(seqs, rest, page_size=PAGE_SIZE, t_pad=32, s_pad=8, max_pages=max_pages)

    for step, starts in ((step_a, [0] * 5), (step_b, chunk1)):
        h, logits, cache = step_fn(params, step, cache, cfg)
        h, logits = np.asarray(h), np.asarray(logits)
        cu = np.asarray(step.cu_q_lens)
        for s in range(len(seqs)):
            n = cu[s + 1] - cu[s]
            ref_rows = dense[s][starts[s]:starts[s] + n]
            np.testing.assert_allclose(h[cu[s]:cu[s + 1]], ref_rows, atol=1e-4, rtol=1e-4,
                                       err_msg=f"{name} seq {s} hidden")
            last = starts[s] + n - 1
            err = np.abs(logits[s] - dense_logits[s][last]).max()
            assert err < 1e-4 * scale, f"{name} seq {s}: logits diff {err}"
        assert np.all(np.isfinite(logits))  # padded sequences give finite (unused) rows


def test_padding_rows_do_not_touch_real_pages() -> None:
    """Padded token rows write only to page 0, so they never corrupt a sequence's pages."""
    cfg = CONFIGS["qwen3_like"]
    params = random_params(cfg, seed=2)
    seq = PagedSeq([3, 1])
    step = build_step([seq], [[5, 6, 7]], page_size=PAGE_SIZE, t_pad=16, s_pad=2, max_pages=2)
    fwd = jax.jit(llama.forward, static_argnames=("cfg",))
    _, cache = fwd(params, step, llama.init_kv_cache(cfg, 4, PAGE_SIZE), cfg)
    k0, _ = cache[0]
    k0 = np.asarray(k0)  # [K, P, L, H]
    assert np.abs(k0[:, 3, :3]).sum() > 0  # the 3 tokens landed in page 3
    assert np.all(k0[:, 3, 3] == 0) and np.all(k0[:, 1] == 0) and np.all(k0[:, 2] == 0)


def test_kv_cache_layout_and_sharding() -> None:
    cfg = CONFIGS["mistral_like"]
    cache = llama.init_kv_cache(cfg, 6, PAGE_SIZE, dtype="bfloat16")
    assert len(cache) == cfg.num_layers
    for k, v in cache:
        assert k.shape == v.shape == (cfg.num_kv_heads, 6, PAGE_SIZE, cfg.head_dim)
        assert k.dtype == jnp.bfloat16
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))
    cache = llama.init_kv_cache(cfg, 6, PAGE_SIZE, sharding=sharding)
    assert all(k.sharding == sharding and v.sharding == sharding for k, v in cache)
    with pytest.raises(ValueError, match="num_pages"):
        llama.init_kv_cache(cfg, 0, PAGE_SIZE)


def test_bfloat16_forward_with_donated_cache() -> None:
    """bf16 params and cache give f32 logits close to the f32 model; the cache is donated."""
    cfg32 = CONFIGS["qwen3_like"]
    cfg16 = cfg32.replace(dtype="bfloat16")
    params32 = random_params(cfg32, seed=3)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params32)
    seq32, seq16 = PagedSeq([2, 3]), PagedSeq([2, 3])
    tokens = [[4, 8, 15, 16, 23, 42]]
    step = build_step([seq32], tokens, page_size=PAGE_SIZE, t_pad=8, s_pad=1, max_pages=2)
    build_step([seq16], tokens, page_size=PAGE_SIZE, t_pad=8, s_pad=1, max_pages=2)
    fwd = jax.jit(llama.forward, static_argnames=("cfg",), donate_argnums=(2,))
    ref, _ = fwd(params32, step, llama.init_kv_cache(cfg32, 4, PAGE_SIZE), cfg32)
    cache16 = llama.init_kv_cache(cfg16, 4, PAGE_SIZE)
    got, new_cache = fwd(params16, step, cache16, cfg16)
    assert got.dtype == jnp.float32 and new_cache[0][0].dtype == jnp.bfloat16
    ref = np.asarray(ref)
    assert np.abs(np.asarray(got) - ref).max() < 0.05 * np.abs(ref).max()
    assert cache16[0][0].is_deleted()  # donated: updated in place, not copied
