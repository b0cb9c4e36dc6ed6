"""ShardedAttention (write pages + attend under shard_map) == the one-device attention step.

Random pools with a random, permuted page layout and ragged sequences (decode rows and prefill
chunks together); KV heads split over `model` (K divisible by tp) and replicated (tp > K).
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
from xlaserve.sharding.specs import ShardedAttention, shard_attention

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


@pytest.mark.parametrize("k_heads,dp,tp", [(4, 1, 2), (4, 1, 4), (4, 2, 4), (4, 1, 8),
                                           (2, 1, 4), (2, 1, 8), (8, 1, 8), (1, 1, 2)])
def test_sharded_attention_matches(k_heads: int, dp: int, tp: int) -> None:
    cfg = _cfg(k_heads)
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=tp, data_parallel_size=dp))
    attn = shard_attention(mesh, cfg, impl="reference")
    q, k_new, v_new, k_pages, v_pages, inputs = _data(k_heads)
    rules_kv = PartitionSpec("model") if k_heads % tp == 0 else PartitionSpec()
    k_pages = jax.device_put(k_pages, NamedSharding(mesh, rules_kv))
    v_pages = jax.device_put(v_pages, NamedSharding(mesh, rules_kv))
    fn = jax.jit(functools.partial(attn, sm_scale=H ** -0.5, sliding_window=None))
    o, k_out, v_out = fn(q, k_new, v_new, k_pages, v_pages, inputs)
    want_o, want_k, want_v = _expected(k_heads)
    assert o.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(None, "model")), 3)
    np.testing.assert_allclose(np.asarray(o), want_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(k_out), want_k)
    np.testing.assert_array_equal(np.asarray(v_out), want_v)
    assert k_out.sharding.is_equivalent_to(k_pages.sharding, 4)


@pytest.mark.parametrize("k_heads", [4, 2])
def test_sharded_attention_sliding_window(k_heads: int) -> None:
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=4))
    attn = shard_attention(mesh, _cfg(k_heads), impl="reference")
    o, _, _ = jax.jit(functools.partial(attn, sm_scale=H ** -0.5, sliding_window=4))(
        *_data(k_heads))
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
        q, k_new, v_new, k_pages, v_pages, inputs)
    np.testing.assert_allclose(np.asarray(o), _expected(2)[0], rtol=2e-5, atol=2e-5)


def test_replicated_kv_attends_without_copying_the_pool() -> None:
    """tp > K: each device reads its one KV head straight from the replicated [K, P, L, H] pool.

    Slicing the head out (dynamic_slice) materialised [1, P, L, H] of K and of V on every step
    and layer whenever the kernel is a custom call, and as much temp memory (a one-off check by
    hand on an H100, not a bench run, saw 512 MiB of temp memory for 2 x 512 MiB pools). Compiled
    only (the Pallas interpreter keeps the kernel an opaque loop, like the GPU's custom call).
    """
    num_pages, k_heads = 4096, 2
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=4))
    attn = shard_attention(mesh, _cfg(k_heads), impl="pallas_interpret")
    t, s, m = 16, 8, 4
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=np.int32)
    inputs = StepInputs(token_ids=i32((t,)), positions=i32((t,)), slot_mapping=i32((t,)),
                        cu_q_lens=i32((s + 1,)), kv_lens=i32((s,)), page_table=i32((s, m)),
                        num_seqs=i32((1,)), logits_indices=i32((s,)))
    f32 = functools.partial(jax.ShapeDtypeStruct, dtype=np.float32)
    pool = jax.ShapeDtypeStruct((k_heads, num_pages, L, H), np.float32,
                                sharding=NamedSharding(mesh, PartitionSpec()))
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
