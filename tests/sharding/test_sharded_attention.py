"""ShardedAttention (write pages + attend under shard_map) == the one-device attention step.

Random pools with a random, permuted page layout and ragged sequences (decode rows and prefill
chunks together); KV heads split over `model` (K divisible by tp) and, when tp > K, stored once
per device: the cache holds tp heads, device d the copy of KV head d // (tp // K).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from xlaserve.runtime.batch import StepInputs
from xlaserve.runtime.config import ModelConfig, ParallelConfig
from xlaserve.runtime.models import llama
from xlaserve.sharding.mesh import make_mesh
from xlaserve.sharding.rules import kv_cache_heads
from xlaserve.sharding.specs import ShardedAttention, kv_cache_sharding, shard_attention

N, H, L, P, M = 8, 16, 8, 24, 4  # q heads, head dim, page size, pages, max pages per sequence
Q_LENS, KV_LENS = (1, 5, 1, 9), (7, 12, 17, 9)  # decode, chunk, decode, first prefill


def _cfg(num_kv_heads: int) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_layers=1, num_heads=N, num_kv_heads=num_kv_heads, head_dim=H,
                       max_position_embeddings=128, dtype="float32")


def _data(k_heads: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t_total = 32
    perm = rng.permutation(np.arange(1, P))
    table = np.zeros((8, M), np.int32)
    slots, cu = [], [0]
    for s, (q, kv) in enumerate(zip(Q_LENS, KV_LENS)):
        pages = perm[s * M:(s + 1) * M]
        table[s] = pages
        slots += [int(pages[p // L]) * L + p % L for p in range(kv - q, kv)]
        cu.append(cu[-1] + q)
    n_real = cu[-1]
    cu_arr = np.array(cu + [cu[-1]] * (8 - len(Q_LENS)), np.int32)
    inputs = StepInputs(
        token_ids=np.zeros(t_total, np.int32), positions=np.zeros(t_total, np.int32),
        slot_mapping=np.array(slots + [0] * (t_total - n_real), np.int32),
        cu_q_lens=cu_arr, kv_lens=np.array(list(KV_LENS) + [0] * 4, np.int32),
        page_table=table, num_seqs=np.array([len(Q_LENS)], np.int32),
        logits_indices=np.zeros(8, np.int32))
    f = functools.partial(rng.standard_normal, dtype=np.float32)
    return (f((t_total, N, H)), f((t_total, k_heads, H)), f((t_total, k_heads, H)),
            f((k_heads, P, L, H)), f((k_heads, P, L, H)), inputs)


@functools.lru_cache(maxsize=None)
def _expected(k_heads: int, sliding_window: int | None = None):
    q, k_new, v_new, k_pages, v_pages, inputs = _data(k_heads)
    fn = jax.jit(functools.partial(llama.paged_attention, sm_scale=H ** -0.5,
                                   sliding_window=sliding_window, impl="reference"))
    return [np.asarray(a) for a in fn(q, k_new, v_new, k_pages, v_pages, inputs)]


def _on_mesh(mesh, k_heads: int, tp: int, *pools: np.ndarray) -> list[jax.Array]:
    """Logical [K, P, L, H] pools laid out as the plan stores them (kv_cache_heads heads with
    kv_cache_sharding): K heads split over `model`, or (tp > K) tp heads, each KV head repeated
    for the tp // K devices reading it."""
    cfg = _cfg(k_heads)
    group = kv_cache_heads(cfg, tp) // k_heads
    sharding = kv_cache_sharding(cfg, mesh)
    return [jax.device_put(np.repeat(p, group, axis=0), sharding) for p in pools]


@pytest.mark.parametrize("k_heads,dp,tp", [(4, 1, 2), (4, 1, 4), (4, 2, 4), (4, 1, 8),
                                           (2, 1, 4), (2, 1, 8), (8, 1, 8), (1, 1, 2)])
def test_sharded_attention_matches(k_heads: int, dp: int, tp: int) -> None:
    cfg = _cfg(k_heads)
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=tp, data_parallel_size=dp))
    attn = shard_attention(mesh, cfg, impl="reference")
    q, k_new, v_new, k_pages, v_pages, inputs = _data(k_heads)
    k_pages, v_pages = _on_mesh(mesh, k_heads, tp, k_pages, v_pages)
    # Each device holds max(K / tp, 1) heads: never a KV head it does not read.
    assert k_pages.addressable_shards[0].data.shape[0] == max(k_heads // tp, 1)
    fn = jax.jit(functools.partial(attn, sm_scale=H ** -0.5, sliding_window=None))
    o, k_out, v_out = fn(q, k_new, v_new, k_pages, v_pages, inputs)
    want_o, want_k, want_v = _expected(k_heads)
    group = k_pages.shape[0] // k_heads
    assert o.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(None, "model")), 3)
    np.testing.assert_allclose(np.asarray(o), want_o, rtol=1e-5, atol=1e-5)
    # Every stored copy of a KV head got the new rows (not only the first).
    np.testing.assert_array_equal(np.asarray(k_out), np.repeat(want_k, group, axis=0))
    np.testing.assert_array_equal(np.asarray(v_out), np.repeat(want_v, group, axis=0))
    assert k_out.sharding.is_equivalent_to(k_pages.sharding, 4)


@pytest.mark.parametrize("k_heads", [4, 2])
def test_sharded_attention_sliding_window(k_heads: int) -> None:
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=4))
    attn = shard_attention(mesh, _cfg(k_heads), impl="reference")
    q, k_new, v_new, k_pages, v_pages, inputs = _data(k_heads)
    o, _, _ = jax.jit(functools.partial(attn, sm_scale=H ** -0.5, sliding_window=4))(
        q, k_new, v_new, *_on_mesh(mesh, k_heads, 4, k_pages, v_pages), inputs)
    want = _expected(k_heads, 4)[0]
    assert not np.allclose(want, _expected(k_heads)[0])  # the window matters here
    np.testing.assert_allclose(np.asarray(o), want, rtol=1e-5, atol=1e-5)


def test_sharded_attention_pallas_interpret() -> None:
    """The Pallas kernel (interpreted on CPU) runs per device under shard_map too."""
    cfg = _cfg(2)
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=4))
    attn = shard_attention(mesh, cfg, impl="pallas_interpret")
    q, k_new, v_new, k_pages, v_pages, inputs = _data(2)
    o, _, _ = jax.jit(functools.partial(attn, sm_scale=H ** -0.5, sliding_window=None))(
        q, k_new, v_new, *_on_mesh(mesh, 2, 4, k_pages, v_pages), inputs)
    np.testing.assert_allclose(np.asarray(o), _expected(2)[0], rtol=2e-5, atol=2e-5)


def test_wrong_cache_head_count_is_a_clear_error() -> None:
    """A [K, P, L, H] cache at tp > K (made without the plan) is refused, naming the fix."""
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=4))
    attn = shard_attention(mesh, _cfg(2), impl="reference")
    q, k_new, v_new, k_pages, v_pages, inputs = _data(2)
    with pytest.raises(ValueError, match="stores 4 heads.*ShardingPlan.init_kv_cache"):
        attn(q, k_new, v_new, k_pages, v_pages, inputs, sm_scale=1.0, sliding_window=None)


def test_tp_above_kv_heads_stores_and_reads_one_head_per_device() -> None:
    """tp > K: each device's pools are [1, P, L, H], the one KV head it reads, and the step
    neither copies a pool nor needs temp memory of a pool's size.

    Before, every device stored all K heads ([K, P, L, H] replicated): K times the KV memory.
    Compiled only (the Pallas interpreter keeps the kernel an opaque loop, like the GPU's
    custom call, so a slice of the pool would show as a copy in temp memory).
    """
    num_pages, k_heads, tp = 4096, 2, 4
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=tp))
    attn = shard_attention(mesh, _cfg(k_heads), impl="pallas_interpret")
    t, s, m = 16, 8, 4
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=np.int32)
    inputs = StepInputs(token_ids=i32((t,)), positions=i32((t,)), slot_mapping=i32((t,)),
                        cu_q_lens=i32((s + 1,)), kv_lens=i32((s,)), page_table=i32((s, m)),
                        num_seqs=i32((1,)), logits_indices=i32((s,)))
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=np.float32)
    pool_sharding = kv_cache_sharding(_cfg(k_heads), mesh)  # the plan's layout
    pool = jax.ShapeDtypeStruct((kv_cache_heads(_cfg(k_heads), tp), num_pages, L, H),
                                np.float32, sharding=pool_sharding)
    assert pool_sharding.shard_shape(pool.shape) == (1, num_pages, L, H)
    fn = jax.jit(functools.partial(attn, sm_scale=H ** -0.5, sliding_window=None),
                 donate_argnums=(3, 4))
    compiled = fn.lower(f32((t, N, H)), f32((t, k_heads, H)), f32((t, k_heads, H)), pool, pool,
                        inputs).compile()
    head_pool_bytes = num_pages * L * H * 4  # one KV head of one pool: 2 MiB
    assert compiled.memory_analysis().temp_size_in_bytes < head_pool_bytes / 4


def test_sharded_attention_is_hashable_static() -> None:
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=2))
    a, b = shard_attention(mesh, _cfg(4)), shard_attention(mesh, _cfg(4))
    assert isinstance(a, ShardedAttention) and a == b and hash(a) == hash(b)


def test_shard_attention_validates_now() -> None:
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=8))
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        shard_attention(mesh, ModelConfig(
            model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
            num_layers=1, num_heads=24, num_kv_heads=3, head_dim=16,
            max_position_embeddings=128))
