"""Golden PartitionSpec of every parameter: a change of sharding shows up as a diff here.

The table is regenerated from the rules and the model's logical axes and compared with the
checked-in golden_partition_specs.json. After an intended change, rewrite it with
``XLASERVE_UPDATE_GOLDEN=1 pytest tests/sharding/test_golden_specs.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import pytest
from jax.sharding import PartitionSpec

from xlaserve.runtime.config import ModelConfig, ParallelConfig
from xlaserve.runtime.models import llama
from xlaserve.sharding.mesh import make_mesh
from xlaserve.sharding.rules import kv_cache_heads, spec_to_str
from xlaserve.sharding.specs import kv_cache_sharding, param_shardings

GOLDEN = pathlib.Path(__file__).with_name("golden_partition_specs.json")

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
             head_dim=16, max_position_embeddings=128, dtype="float32")
# name -> (model overrides, tensor_parallel_size, data_parallel_size)
CASES: dict[str, tuple[dict[str, object], int, int]] = {
    "llama_kv4_tp4": (dict(model_type="llama", num_kv_heads=4), 4, 1),
    "llama_kv2_tp8_kv_replicated": (dict(model_type="llama", num_kv_heads=2), 8, 1),
    "qwen2_bias_kv2_dp2_tp2": (dict(model_type="qwen2", num_kv_heads=2, attention_bias=True), 2,
                               2),
    "qwen3_qknorm_tied_kv4_tp2": (dict(model_type="qwen3", num_kv_heads=4, qk_norm=True,
                                       tie_word_embeddings=True), 2, 1),
    "llama_all_biases_kv4_tp4": (dict(model_type="llama", num_kv_heads=4, attention_bias=True,
                                      o_proj_bias=True, mlp_bias=True), 4, 1),
}


def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _table() -> dict[str, dict[str, str]]:
    out = {}
    for name, (overrides, tp, dp) in CASES.items():
        cfg = ModelConfig(**{**_BASE, **overrides})  # type: ignore[arg-type]
        mesh = make_mesh(ParallelConfig(tensor_parallel_size=tp, data_parallel_size=dp))
        shardings = param_shardings(cfg, mesh)
        abstract = llama.abstract_params(cfg)
        flat, _ = jax.tree_util.tree_flatten_with_path(shardings)
        shapes = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
        rows = {}
        for path, sharding in flat:
            spec: PartitionSpec = sharding.spec
            shape = "x".join(str(d) for d in shapes[path].shape)
            rows[_path_str(path)] = f"{shape} {spec_to_str(spec)}"
        heads = kv_cache_heads(cfg, tp)  # [C, P, L, H]: C = K, or tp when tp > K
        rows["<kv_cache k_pages/v_pages>"] = (
            f"{heads}xPxLx{cfg.head_dim} {spec_to_str(kv_cache_sharding(cfg, mesh).spec)}")
        out[name] = dict(sorted(rows.items()))
    return out


def test_golden_partition_specs() -> None:
    table = _table()
    text = json.dumps(table, indent=1, sort_keys=True) + "\n"
    if os.environ.get("XLASERVE_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
        pytest.skip(f"rewrote {GOLDEN.name}")
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing; create it with XLASERVE_UPDATE_GOLDEN=1")
    golden = json.loads(GOLDEN.read_text())
    diff = []
    for case in sorted(set(golden) | set(table)):
        want, got = golden.get(case, {}), table.get(case, {})
        for param in sorted(set(want) | set(got)):
            if want.get(param) != got.get(param):
                diff.append(f"{case}: {param}: golden {want.get(param)} != now {got.get(param)}")
    assert not diff, "PartitionSpecs changed (XLASERVE_UPDATE_GOLDEN=1 to accept):\n" + "\n".join(
        diff)


def test_golden_table_is_not_trivial() -> None:
    """Guards the guard: the table lists every param and splits the big ones."""
    golden = json.loads(GOLDEN.read_text())
    rows = golden["llama_kv4_tp4"]
    assert rows["layers_1/attn/q_proj/kernel"] == "64x8x16 (None, 'model', None)"
    assert rows["layers_0/mlp/down_proj/kernel"] == "128x64 ('model', None)"
    assert rows["<kv_cache k_pages/v_pages>"] == "4xPxLx16 ('model', None, None, None)"
    replicated = golden["llama_kv2_tp8_kv_replicated"]
    assert replicated["layers_0/attn/k_proj/kernel"] == "64x2x16 (None, None, None)"
    assert replicated["<kv_cache k_pages/v_pages>"] == "8xPxLx16 ('model', None, None, None)"
    n_params = len(jax.tree.leaves(llama.abstract_params(ModelConfig(
        model_type="llama", num_kv_heads=4, **_BASE))))  # type: ignore[arg-type]
    assert len(rows) == n_params + 1
