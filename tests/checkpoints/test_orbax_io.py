"""Orbax save/restore of converted params, and `xlaserve convert` end to end."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xlaserve import cli
from xlaserve.checkpoints import loader, orbax_io
from xlaserve.runtime.batch import StepInputs
from xlaserve.runtime.config import ModelConfig, RopeScaling
from xlaserve.runtime.models import llama

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=64, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 32),
                  eos_token_ids=(2, 3), bos_token_id=1, dtype="float32")


def random_params(cfg: ModelConfig) -> llama.Params:
    return jax.jit(functools.partial(llama.init_params, cfg))(jax.random.key(3))


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory, params) of one saved checkpoint, shared by the tests below."""
    path = tmp_path_factory.mktemp("orbax") / "ckpt"
    params = random_params(CFG)
    orbax_io.save(path, CFG, params)
    return path, params


def test_save_restore_roundtrip(saved) -> None:
    path, params = saved
    assert orbax_io.is_orbax_dir(path)
    cfg, restored = orbax_io.restore(path)
    assert cfg == CFG
    assert_trees_equal(restored, params)
    with pytest.raises(ValueError, match="already holds params"):
        orbax_io.save(path, CFG, params)


def test_restore_onto_mesh_and_cast(saved) -> None:
    path, params = saved
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rules = {"q_heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"}
    shardings = jax.tree.map(lambda names: NamedSharding(mesh, P(*(rules.get(n) for n in names))),
                             llama.param_logical_axes(CFG),
                             is_leaf=lambda x: isinstance(x, tuple))
    _, restored = orbax_io.restore(path, shardings=shardings)
    for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert x.sharding == s
    assert_trees_equal(restored, params)
    cfg16, p16 = orbax_io.restore(path, dtype="bfloat16")
    assert cfg16.dtype == "bfloat16"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(p16))


def test_config_dict_roundtrip_rejects_unknown_fields() -> None:
    assert orbax_io.config_from_dict(orbax_io.config_to_dict(CFG)) == CFG
    with pytest.raises(ValueError, match="unknown field"):
        orbax_io.config_from_dict({**orbax_io.config_to_dict(CFG), "bogus": 1})


def _last_logits(loaded: loader.LoadedModel) -> np.ndarray:
    cfg = loaded.config
    i32 = functools.partial(np.asarray, dtype=np.int32)
    # One sequence of 5 tokens over pages [2, 1] (page size 4), padded to 8 token rows.
    step = StepInputs(token_ids=i32([3, 9, 4, 1, 7, 0, 0, 0]),
                      positions=i32([0, 1, 2, 3, 4, 0, 0, 0]),
                      slot_mapping=i32([8, 9, 10, 11, 4, 0, 0, 0]), cu_q_lens=i32([0, 5]),
                      kv_lens=i32([5]), page_table=i32([[2, 1]]), num_seqs=i32([1]),
                      logits_indices=i32([4]))
    fwd = jax.jit(llama.forward, static_argnames=("cfg",))
    logits, _ = fwd(loaded.params, step, llama.init_kv_cache(cfg, 3, 4), cfg)
    return np.asarray(logits)


@pytest.mark.hf
def test_convert_cli_then_load_gives_same_logits(tmp_path) -> None:
    pytest.importorskip("torch")
    import hf_models

    src = hf_models.make_hf_model(tmp_path, "qwen2")
    (src / "tokenizer.json").write_text("{}")  # a side file that must be copied along
    out = tmp_path / "converted"
    rc = cli.main(["convert", "--model", str(src), "--output", str(out), "--dtype", "float32"])
    assert rc == 0
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert not list(out.glob("*.safetensors"))
    a = loader.load_model(str(out), dtype="float32")
    b = loader.load_model(str(src), dtype="float32")
    assert a.config == b.config
    assert_trees_equal(a.params, b.params)
    np.testing.assert_array_equal(_last_logits(a), _last_logits(b))
    # Converting into a non-empty directory or from a bad path is a usage error (exit 2).
    assert cli.main(["convert", "--model", str(src), "--output", str(out)]) == 2
    assert cli.main(["convert", "--model", str(tmp_path / "nope"),
                     "--output", str(tmp_path / "o2")]) == 2
