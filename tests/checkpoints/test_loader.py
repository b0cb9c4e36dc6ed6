"""checkpoints/loader.py: sources (HF dir, orbax dir, builtin:NAME), formats, shardings."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xlaserve.checkpoints import loader, orbax_io
from xlaserve.runtime.models import llama

CONFIG_JSON = """{"model_type": "qwen3", "vocab_size": 96, "hidden_size": 32,
 "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
 "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64, "eos_token_id": 5}"""


@pytest.fixture
def config_only_dir(tmp_path):
    (tmp_path / "config.json").write_text(CONFIG_JSON)
    return tmp_path


def test_dummy_from_a_config_only_dir(config_only_dir) -> None:
    a = loader.load_model(str(config_only_dir), load_format="dummy", dtype="float32")
    b = loader.load_model(str(config_only_dir), load_format="dummy", dtype="float32")
    assert a.config.model_type == "qwen3" and a.config.qk_norm and a.config.eos_token_ids == (5,)
    assert a.model_dir == config_only_dir
    assert jax.tree.structure(a.params) == jax.tree.structure(llama.abstract_params(a.config))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        assert x.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # seeded, deterministic
    c = loader.load_model(str(config_only_dir), load_format="dummy", seed=1)
    assert jax.tree.leaves(c.params)[0].dtype == jax.numpy.bfloat16
    assert not np.array_equal(np.asarray(c.params["embed"]["embedding"], np.float32),
                              np.asarray(a.params["embed"]["embedding"]))


def test_dummy_on_a_mesh_via_shardings_fn(config_only_dir) -> None:
    mesh = Mesh(np.array(jax.devices()).reshape(1, 8), ("data", "model"))

    def shardings_fn(cfg):
        return jax.tree.map(
            lambda names: NamedSharding(mesh, P(*("model" if n == "mlp" else None
                                                  for n in names))),
            llama.param_logical_axes(cfg), is_leaf=lambda x: isinstance(x, tuple))

    m = loader.load_model(str(config_only_dir), load_format="dummy", shardings_fn=shardings_fn)
    up = m.params["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert up.sharding.spec == P(None, "model")
    assert len({str(s.index) for s in up.addressable_shards}) == 8


def test_bad_arguments(config_only_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="load_format='pickle'"):
        loader.load_model(str(config_only_dir), load_format="pickle")
    with pytest.raises(ValueError, match="load_format='orbax'"):
        loader.load_model(str(config_only_dir), load_format="orbax")
    with pytest.raises(ValueError, match="no .*safetensors"):
        loader.load_model(str(config_only_dir))
    with pytest.raises(ValueError, match="model='builtin:no-such-model'"):
        loader.load_model("builtin:no-such-model")


def test_orbax_dir_is_detected(config_only_dir, tmp_path) -> None:
    dummy = loader.load_model(str(config_only_dir), load_format="dummy", dtype="float32")
    out = tmp_path / "ours"
    orbax_io.save(out, dummy.config, dummy.params)
    got = loader.load_model(str(out), dtype="float32")
    assert got.config == dummy.config and got.model_dir == out
    for x, y in zip(jax.tree.leaves(got.params), jax.tree.leaves(dummy.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # dummy weights for a converted dir's config work too
    again = loader.load_model(str(out), load_format="dummy", dtype="float32")
    assert again.config == dummy.config


def test_builtin_model(tmp_path, monkeypatch) -> None:
    builtin = pytest.importorskip("xlaserve.checkpoints.builtin")
    monkeypatch.setenv("XLASERVE_CACHE_DIR", str(tmp_path))
    m = loader.load_model("builtin:tiny", dtype="float32")
    assert m.model_dir == builtin.builtin_model_dir("tiny")
    assert (m.model_dir / "tokenizer.json").is_file()
    assert jax.tree.structure(m.params) == jax.tree.structure(llama.abstract_params(m.config))
    copy = tmp_path / "copy"
    shutil.copytree(m.model_dir, copy)
    same = loader.load_model(str(copy), dtype="float32")
    for x, y in zip(jax.tree.leaves(m.params), jax.tree.leaves(same.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dummy_values_have_the_init_statistics_and_ignore_the_layout(config_only_dir) -> None:
    a = loader.load_model(str(config_only_dir), load_format="dummy", dtype="float32", seed=3)
    flat = jax.tree_util.tree_flatten_with_path(a.params)[0]
    kernels = [np.asarray(x) for p, x in flat if "kernel" in jax.tree_util.keystr(p)]
    allk = np.concatenate([k.ravel() for k in kernels])
    assert abs(allk.mean()) < 1e-3 and abs(allk.std() - 0.02) < 1e-3
    for k in kernels:  # no two parameters share their values
        assert len(np.unique(k.ravel())) > 0.9 * k.size
    assert not np.array_equal(kernels[0].ravel()[:64], kernels[1].ravel()[:64])
    for p, x in flat:
        if "norm" in jax.tree_util.keystr(p):
            np.testing.assert_array_equal(np.asarray(x), 1.0)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    sharded = loader.load_model(str(config_only_dir), load_format="dummy", dtype="float32",
                                seed=3, shardings_fn=lambda cfg: NamedSharding(mesh, P()))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(sharded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
