"""Mesh construction, validation errors, the rules table and logical -> PartitionSpec mapping."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

from xlaserve.runtime.config import ModelConfig, ParallelConfig
from xlaserve.sharding.mesh import make_mesh, validate_parallel
from xlaserve.sharding.rules import TP_RULES, kv_cache_heads, logical_to_spec, rules_for
from xlaserve.sharding.specs import ShardingPlan, kv_cache_sharding, param_shardings


def _cfg(**kw: object) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                num_layers=1, num_heads=8, num_kv_heads=4, head_dim=16,
                max_position_embeddings=128, dtype="float32")
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("dp,tp", [(1, 1), (1, 2), (1, 8), (2, 4), (8, 1), (2, 2)])
def test_mesh_shape_and_axes(dp: int, tp: int) -> None:
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=tp, data_parallel_size=dp))
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": dp, "model": tp}
    ids = [d.id for d in mesh.devices.flat]
    assert ids == sorted(d.id for d in jax.devices())[:dp * tp]
    assert len(set(ids)) == dp * tp


def test_mesh_too_many_devices() -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size=16.*only 8"):
        make_mesh(ParallelConfig(tensor_parallel_size=16))
    with pytest.raises(ValueError, match="data_parallel_size=4"):
        make_mesh(ParallelConfig(tensor_parallel_size=4, data_parallel_size=4))


def test_mesh_does_not_divide_devices() -> None:
    with pytest.raises(ValueError, match="= 3 does not divide the 8"):
        make_mesh(ParallelConfig(tensor_parallel_size=3))
    # An explicit device list is what counts.
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=3), devices=jax.devices()[:3])
    assert mesh.shape["model"] == 3


@pytest.mark.parametrize("field,kw", [
    ("num_heads", dict(num_heads=12, num_kv_heads=4, head_dim=16)),
    ("vocab_size", dict(vocab_size=250)),
    ("intermediate_size", dict(intermediate_size=100)),
])
def test_model_does_not_split(field: str, kw: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=f"tensor_parallel_size=8.*{field}"):
        validate_parallel(ParallelConfig(tensor_parallel_size=8), _cfg(**kw), 8)
    with pytest.raises(ValueError, match=field):
        ShardingPlan.create(_cfg(**kw), ParallelConfig(tensor_parallel_size=8))


def test_kv_heads_neither_divide_nor_multiple() -> None:
    cfg = _cfg(num_heads=24, num_kv_heads=6, vocab_size=256)
    with pytest.raises(ValueError, match="num_kv_heads=6"):
        validate_parallel(ParallelConfig(tensor_parallel_size=4), cfg, 8)
    # Below tp and dividing tp: allowed (replicated KV).
    validate_parallel(ParallelConfig(tensor_parallel_size=8), _cfg(num_kv_heads=2), 8)


def test_logical_to_spec() -> None:
    assert logical_to_spec(("embed", "q_heads", "head_dim")) == P(None, "model", None)
    assert logical_to_spec(("mlp", "embed")) == P("model", None)
    assert logical_to_spec(("vocab", None)) == P("model", None)
    assert logical_to_spec(()) == P()


def test_logical_to_spec_collision() -> None:
    with pytest.raises(ValueError, match="'q_heads' and 'mlp'.*'model'"):
        logical_to_spec(("q_heads", "mlp"))


def test_logical_to_spec_unknown_axis() -> None:
    with pytest.raises(ValueError, match="'ffw'"):
        logical_to_spec(("embed", "ffw"))


def test_rules_kv_heads_switch() -> None:
    table = dict(rules_for(_cfg(num_kv_heads=4), 4))
    assert table["kv_heads"] == "model"
    assert dict(rules_for(_cfg(num_kv_heads=4), 8))["kv_heads"] is None
    assert dict(rules_for(_cfg(num_kv_heads=2), 4))["kv_heads"] is None
    # Only kv_heads changes.
    other = {k: v for k, v in rules_for(_cfg(num_kv_heads=2), 4) if k != "kv_heads"}
    assert other == {k: v for k, v in TP_RULES if k != "kv_heads"}


def test_kv_cache_sharding_above_and_below_tp() -> None:
    """The cache's stored heads are always split over `model`: K of them when tp divides K,
    else tp (one copy of its KV head per device)."""
    mesh4 = make_mesh(ParallelConfig(tensor_parallel_size=4))
    for k in (8, 4, 2, 1):
        assert kv_cache_sharding(_cfg(num_kv_heads=k), mesh4).spec == P("model", None, None, None)
    assert [kv_cache_heads(_cfg(num_kv_heads=k), 4) for k in (8, 4, 2, 1)] == [8, 4, 4, 4]
    assert kv_cache_heads(_cfg(num_kv_heads=2), 1) == 2


def test_param_shardings_cover_every_param_and_divide() -> None:
    from xlaserve.runtime.models import llama

    cfg = _cfg(num_kv_heads=2, attention_bias=True, model_type="qwen2")
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=4, data_parallel_size=2))
    shardings = param_shardings(cfg, mesh)
    abstract = llama.abstract_params(cfg)
    assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
    for s, a in zip(jax.tree.leaves(shardings), jax.tree.leaves(abstract)):
        assert len(s.spec) == len(a.shape)
        s.shard_shape(a.shape)  # raises if a split dimension does not divide


def test_plan_rejects_mismatched_mesh() -> None:
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=2))
    with pytest.raises(ValueError, match="tensor_parallel_size=4"):
        ShardingPlan.create(_cfg(), ParallelConfig(tensor_parallel_size=4), mesh=mesh)
