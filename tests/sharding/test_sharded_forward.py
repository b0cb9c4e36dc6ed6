"""Sharded forward == one-device forward, on meshes over the 8 fake CPU devices.

Two sequences are prefilled together, then decoded greedily for a few steps through the paged
cache. At every step the sharded logits must match the one-device logits (float32) and the
greedy tokens must be identical; the final KV cache must match too. The models have KV heads
above, equal to and below tp (KV heads split; or, below tp, replicated projections and one
stored copy of its KV head per device).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from xlaserve.runtime.batch import StepInputs
from xlaserve.runtime.config import ModelConfig, ParallelConfig
from xlaserve.runtime.models import llama
from xlaserve.sharding.specs import ShardingPlan, describe_all_reduce

PAGE_SIZE = 8
NUM_PAGES = 12
T_BUCKET, S_BUCKET, MAX_PAGES = 16, 4, 4
PROMPTS = ([3, 17, 99, 5, 250], [7, 7, 1, 200, 31, 64, 128, 9, 2, 45, 77])
DECODE_STEPS = 4


def _assert_logits_close(got: np.ndarray, want: np.ndarray, msg: str = "") -> None:
    """float32 tolerance relative to the logits' scale: sharding changes the order of the
    matmul reductions (over heads and MLP columns), so errors of a few ulps of the largest
    activations are expected; anything structural (a wrong head, a missing shard) is far off."""
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * scale, err_msg=msg)


def _cfg(num_kv_heads: int = 4, **kw: object) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                num_layers=2, num_heads=8, num_kv_heads=num_kv_heads, head_dim=16,
                max_position_embeddings=128, dtype="float32")
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def _step(seqs: list[dict]) -> StepInputs:
    """StepInputs for each sequence's tokens past its computed count (a toy scheduler)."""
    tok, pos, slot, cu = [], [], [], [0]
    kv_lens = np.zeros(S_BUCKET, np.int32)
    table = np.zeros((S_BUCKET, MAX_PAGES), np.int32)
    for s, seq in enumerate(seqs):
        new = range(seq["computed"], len(seq["tokens"]))
        tok += [seq["tokens"][p] for p in new]
        pos += list(new)
        slot += [seq["pages"][p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for p in new]
        cu.append(len(tok))
        kv_lens[s] = len(seq["tokens"])
        table[s, :len(seq["pages"])] = seq["pages"]
    pad = T_BUCKET - len(tok)
    cu += [cu[-1]] * (S_BUCKET - len(seqs))
    cu_arr = np.array(cu, np.int32)
    logits_idx = np.maximum(cu_arr[1:] - 1, 0).astype(np.int32)
    return StepInputs(
        token_ids=np.array(tok + [0] * pad, np.int32),
        positions=np.array(pos + [0] * pad, np.int32),
        slot_mapping=np.array(slot + [0] * pad, np.int32),  # padding -> page 0
        cu_q_lens=cu_arr, kv_lens=kv_lens, page_table=table,
        num_seqs=np.array([len(seqs)], np.int32), logits_indices=logits_idx)


def _generate(step_fn, kv_cache) -> tuple[list[np.ndarray], list[list[int]], object]:
    """Prefill both prompts, then DECODE_STEPS greedy steps; returns logits, tokens, cache."""
    seqs = [dict(tokens=list(p), computed=0, pages=[1 + 4 * i + j for j in range(MAX_PAGES)])
            for i, p in enumerate(PROMPTS)]
    all_logits = []
    for _ in range(1 + DECODE_STEPS):
        logits, kv_cache = step_fn(_step(seqs), kv_cache)
        logits = np.asarray(jax.device_get(logits))[:len(seqs)]  # [S, V]
        all_logits.append(logits)
        for seq, row in zip(seqs, logits):
            seq["computed"] = len(seq["tokens"])
            seq["tokens"].append(int(np.argmax(row)))
    tokens = [s["tokens"][len(p):] for s, p in zip(seqs, PROMPTS)]
    return all_logits, tokens, kv_cache


def _scaled_params(cfg: ModelConfig, noisy: bool, key: jax.Array) -> llama.Params:
    """init_params x 8 (larger logits: fewer near-ties). noisy: biases and norm scales are
    random too (init gives zeros and ones, which would hide a bias or norm on the wrong head)."""
    params = jax.tree.map(lambda x: x * 8.0, llama.init_params(cfg, key))
    if not noisy:
        return params
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    out = []
    for (path, x), k in zip(leaves, keys):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("bias", "scale"):
            x = x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


@functools.lru_cache(maxsize=None)
def _reference(cfg: ModelConfig, noisy: bool = False,
               ) -> tuple[list[np.ndarray], list[list[int]], list[np.ndarray]]:
    """One-device run (default device, no mesh), cached per config."""
    params = jax.jit(functools.partial(_scaled_params, cfg, noisy))(jax.random.key(0))
    cache = llama.init_kv_cache(cfg, NUM_PAGES, PAGE_SIZE)
    fwd = jax.jit(functools.partial(llama.forward, cfg=cfg, attention_impl="reference"),
                  donate_argnums=(2,))
    logits, tokens, cache = _generate(lambda inp, kv: fwd(params, inp, kv), cache)
    return logits, tokens, [np.asarray(a) for a in jax.tree.leaves(cache)]


def _sharded(cfg: ModelConfig, dp: int, tp: int, noisy: bool = False, all_reduce: str = "xla"):
    devices = jax.devices()[:dp * tp]  # all 8 unless tp x dp does not divide them (e.g. 6)
    plan = ShardingPlan.create(cfg, ParallelConfig(tensor_parallel_size=tp,
                                                   data_parallel_size=dp),
                               devices=devices, attention_impl="reference")
    plan = plan.with_all_reduce(all_reduce)
    params = jax.jit(functools.partial(_scaled_params, cfg, noisy),
                     out_shardings=plan.param_shardings)(jax.random.key(0))
    cache = plan.init_kv_cache(NUM_PAGES, PAGE_SIZE)
    fwd = jax.jit(
        functools.partial(llama.forward, cfg=cfg, attention_fn=plan.attention_fn,
                          row_parallel_fn=plan.row_parallel_fn),
        in_shardings=(plan.param_shardings, plan.input_sharding, plan.kv_cache_shardings()),
        out_shardings=(plan.input_sharding, plan.kv_cache_shardings()),
        donate_argnums=(2,))
    first = jax.tree.leaves(cache)[0]
    logits, tokens, cache = _generate(lambda inp, kv: fwd(params, inp, kv), cache)
    assert first.is_deleted()  # the cache was donated: updated in place, never copied
    return plan, params, logits, tokens, cache


def _assert_cache_close(plan: ShardingPlan, cache: llama.KVCache,
                        ref_cache: list[np.ndarray]) -> None:
    """The plan's cache holds the one-device cache; when tp > K every stored copy of a KV head
    equals the first (each device wrote its copy)."""
    group = plan.kv_cache_heads // plan.model_cfg.num_kv_heads
    for got, want in zip(jax.tree.leaves(plan.logical_kv_cache(cache)), ref_cache):
        _assert_logits_close(np.asarray(got), want, "kv cache")
    for a in jax.tree.leaves(cache):
        copies = np.asarray(a).reshape((-1, group) + a.shape[1:])
        np.testing.assert_array_equal(copies, np.repeat(copies[:, :1], group, axis=1))


_slow = pytest.mark.slow  # each case compiles its own program: ~5-20 s on a busy 2-core box
CASES = [  # (num_kv_heads, dp, tp): KV above, equal to and below tp
    pytest.param(4, 1, 1, marks=_slow), (4, 1, 2), pytest.param(4, 1, 4, marks=_slow),
    (4, 1, 8), pytest.param(4, 2, 4, marks=_slow),
    pytest.param(2, 1, 2, marks=_slow), (2, 1, 4), pytest.param(2, 1, 8, marks=_slow),
    (2, 2, 4),
]


@pytest.mark.parametrize("num_kv_heads,dp,tp", CASES)
def test_sharded_forward_matches_one_device(num_kv_heads: int, dp: int, tp: int) -> None:
    cfg = _cfg(num_kv_heads)
    ref_logits, ref_tokens, ref_cache = _reference(cfg)
    plan, params, logits, tokens, cache = _sharded(cfg, dp, tp)

    # The params and the cache really are split as planned.
    q_kernel = params["layers_0"]["attn"]["q_proj"]["kernel"]  # [D, N, H]
    assert q_kernel.addressable_shards[0].data.shape == (64, 8 // tp, 16)
    assert len(q_kernel.sharding.device_set) == dp * tp
    leaves = jax.tree.leaves(cache)
    assert all(a.sharding.is_equivalent_to(plan.kv_sharding, 4) for a in leaves)
    kv_local = leaves[0].addressable_shards[0].data.shape[0]
    assert kv_local == max(num_kv_heads // tp, 1)  # never a KV head the device does not read

    assert len({int(np.argmax(r)) for step in ref_logits for r in step}) > 2  # not degenerate
    for i, (got, want) in enumerate(zip(logits, ref_logits)):
        _assert_logits_close(got, want, f"step {i}")
    assert tokens == ref_tokens
    _assert_cache_close(plan, cache, ref_cache)


# GQA layouts of real models (shrunk to head_dim 8) and one on 6 of the 8 devices:
# (model overrides, dp, tp). Biases and norm scales are random, so one on the wrong head shows.
AWKWARD = {
    "qwen2.5-7b_28q_4kv_tp4": (dict(model_type="qwen2", num_heads=28, num_kv_heads=4,
                                    attention_bias=True), 1, 4),  # 7 q heads, 1 KV head each
    "qwen2.5-7b_28q_4kv_tp2": (dict(model_type="qwen2", num_heads=28, num_kv_heads=4,
                                    attention_bias=True), 1, 2),  # 14 q heads, 2 KV heads each
    "llama3-8b_32q_8kv_tp8": (dict(num_heads=32, num_kv_heads=8), 1, 8),
    "qwen2.5-1.5b_12q_2kv_tp4": (dict(model_type="qwen2", num_heads=12, num_kv_heads=2,
                                      attention_bias=True), 1, 4),  # tp > K, 3 q heads each
    "qwen3_qknorm_24q_3kv_tp6": (dict(model_type="qwen3", num_heads=24, num_kv_heads=3,
                                      qk_norm=True, vocab_size=264, intermediate_size=192),
                                 1, 6),  # tp > K
    "mistral_window4_8q_2kv_dp2_tp4": (dict(model_type="mistral", num_heads=8, num_kv_heads=2,
                                            sliding_window=4), 2, 4),  # tp > K
    # Row-parallel biases (o_proj, down_proj) must be added once, after the all-reduce.
    "llama_all_biases_8q_4kv_tp4": (dict(attention_bias=True, o_proj_bias=True, mlp_bias=True),
                                    1, 4),
}


@pytest.mark.parametrize("name", list(AWKWARD))
def test_real_model_head_layouts_match_one_device(name: str) -> None:
    """GQA layouts of real models, split (tp <= K) and replicated (tp > K), with Qwen2 biases,
    Qwen3 q/k norms and a sliding window that the prompts overrun: same logits, same greedy
    tokens and same KV cache as one device."""
    overrides, dp, tp = AWKWARD[name]
    cfg = _cfg(**{"head_dim": 8, **overrides})  # type: ignore[arg-type]
    ref_logits, ref_tokens, ref_cache = _reference(cfg, True)
    plan, _, logits, tokens, cache = _sharded(cfg, dp, tp, True)
    assert len({int(np.argmax(r)) for step in ref_logits for r in step}) > 2  # not degenerate
    for i, (got, want) in enumerate(zip(logits, ref_logits)):
        _assert_logits_close(got, want, f"step {i}")
    assert tokens == ref_tokens
    _assert_cache_close(plan, cache, ref_cache)


@pytest.mark.slow
def test_qwen3_style_bias_qknorm_tied_tp4() -> None:
    """Biases, q/k norms and tied embeddings shard too (kv replicated at tp 4 > 2)."""
    cfg = _cfg(2, model_type="qwen3", attention_bias=True, qk_norm=True,
               tie_word_embeddings=True)
    ref_logits, ref_tokens, _ = _reference(cfg)
    _, _, logits, tokens, _ = _sharded(cfg, 1, 4)
    for got, want in zip(logits, ref_logits):
        _assert_logits_close(got, want)
    assert tokens == ref_tokens


def test_wrong_kv_head_mapping_is_detected() -> None:
    """The comparison can fail: swapping the replicated KV heads changes the logits."""
    cfg = _cfg(2)
    ref_logits, _, _ = _reference(cfg)
    plan = ShardingPlan.create(cfg, ParallelConfig(tensor_parallel_size=4),
                               attention_impl="reference")
    params = jax.jit(functools.partial(llama.init_params, cfg),
                     out_shardings=plan.param_shardings)(jax.random.key(0))
    params = jax.tree.map(lambda x: x * 8.0, params)

    def swapped(q, k_new, v_new, k_pages, v_pages, inputs, **kw):
        o, k_pages, v_pages = plan.attention_fn(q, k_new[:, ::-1], v_new[:, ::-1], k_pages,
                                                v_pages, inputs, **kw)
        return o, k_pages, v_pages

    cache = plan.init_kv_cache(NUM_PAGES, PAGE_SIZE)
    fwd = jax.jit(functools.partial(llama.forward, cfg=cfg, attention_fn=swapped))
    logits, _, _ = _generate(lambda inp, kv: fwd(params, inp, kv), cache)
    with pytest.raises(AssertionError):
        _assert_logits_close(logits[0], ref_logits[0])


# The explicit row-parallel all-reduce (o_proj, down_proj under shard_map + a reduction) in its
# CPU form, psum: the GPU kernel (sharding/all_reduce.py) replaces exactly that reduction and is
# compared with psum on the GPU (tests/sharding/test_all_reduce.py, 2+ GPUs).
@pytest.mark.parametrize("num_kv_heads,dp,tp,overrides", [
    (4, 1, 2, {}), (2, 1, 4, {}), (4, 2, 4, {}),
    pytest.param(4, 1, 4, dict(attention_bias=True, o_proj_bias=True, mlp_bias=True),
                 id="row-parallel-biases"),
])
def test_explicit_row_parallel_all_reduce_matches_one_device(num_kv_heads: int, dp: int,
                                                             tp: int, overrides: dict) -> None:
    cfg = _cfg(num_kv_heads, **overrides)
    noisy = bool(overrides)
    ref_logits, ref_tokens, ref_cache = _reference(cfg, noisy)
    plan, _, logits, tokens, cache = _sharded(cfg, dp, tp, noisy, all_reduce="psum")
    assert plan.row_parallel_fn is not None
    for i, (got, want) in enumerate(zip(logits, ref_logits)):
        _assert_logits_close(got, want, f"step {i}")
    assert tokens == ref_tokens
    _assert_cache_close(plan, cache, ref_cache)


def test_row_parallel_fn_replaces_both_projections() -> None:
    """psum mode adds one shard_map per row-parallel projection (o_proj, down_proj) per layer;
    bias-carrying projections keep the partitioner's collective (plain contraction)."""
    def count(cfg: ModelConfig, mode: str) -> int:
        plan = ShardingPlan.create(cfg, ParallelConfig(tensor_parallel_size=2),
                                   attention_impl="reference").with_all_reduce(mode)
        params = llama.abstract_params(cfg)
        cache = plan.init_kv_cache(NUM_PAGES, PAGE_SIZE)
        jaxpr = jax.make_jaxpr(functools.partial(
            llama.forward, cfg=cfg, attention_fn=plan.attention_fn,
            row_parallel_fn=plan.row_parallel_fn))(params, _step([]), cache)
        return str(jaxpr).count("shard_map[")

    cfg = _cfg(4)
    assert count(cfg, "psum") - count(cfg, "xla") == 2 * cfg.num_layers
    biased = _cfg(4, o_proj_bias=True, mlp_bias=True)
    assert count(biased, "psum") == count(biased, "xla")


def test_all_reduce_modes_on_cpu() -> None:
    """auto falls back to XLA's collective on CPU (logged); custom refuses, naming the field."""
    plan = ShardingPlan.create(_cfg(4), ParallelConfig(tensor_parallel_size=2),
                               attention_impl="reference")
    assert plan.with_all_reduce("auto").row_parallel_fn is None
    assert plan.with_all_reduce("xla").row_parallel_fn is None
    with pytest.raises(ValueError, match="all_reduce='custom'.*platform cpu"):
        plan.with_all_reduce("custom")
    with pytest.raises(ValueError, match="all_reduce='nccl'"):
        ParallelConfig(tensor_parallel_size=2, all_reduce="nccl")
    # what `xlaserve profile` shows ("tp all-reduce")
    assert "cannot run: platform cpu" in describe_all_reduce(plan.mesh, None)
    assert "all_reduce='xla'" in describe_all_reduce(plan.mesh, None, "xla")
    assert "psum" in describe_all_reduce(plan.mesh, plan.with_all_reduce("psum").row_parallel_fn)
    assert describe_all_reduce(None, None).startswith("none")
