"""xlaserve.sharding: device meshes, the logical -> mesh axis rules, and derived shardings.

`mesh.make_mesh` builds the ("data", "model") mesh; `rules.py` holds the one rules table;
`specs.ShardingPlan.create` derives param, KV cache and step-input shardings and the
shard_map'd attention from them.
"""

from __future__ import annotations

from xlaserve.sharding.mesh import MESH_AXES, make_mesh, validate_parallel
from xlaserve.sharding.rules import TP_RULES, kv_cache_heads, logical_to_spec, rules_for
from xlaserve.sharding.specs import (
    ShardedAttention,
    ShardingPlan,
    kv_cache_sharding,
    make_shardings_fn,
    param_shardings,
    shard_attention,
    step_input_sharding,
)

__all__ = [
    "MESH_AXES", "TP_RULES", "ShardedAttention", "ShardingPlan", "kv_cache_heads",
    "kv_cache_sharding",
    "logical_to_spec", "make_mesh", "make_shardings_fn", "param_shardings", "rules_for",
    "shard_attention", "step_input_sharding", "validate_parallel",
]
