"""Parameter declarations: full-size counts via jax.eval_shape, logical axes, on-device init."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models import llama
from xlaserve.runtime.models.layers import LOGICAL_AXES

# The published config.json files (fields we read), written here so no download is needed.
LLAMA_31_8B = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
}
QWEN3_8B = {
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": None, "tie_word_embeddings": False, "use_sliding_window": False,
    "sliding_window": None, "attention_bias": False, "hidden_act": "silu",
    "bos_token_id": 151643, "eos_token_id": 151645,
}

TINY = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                   max_position_embeddings=64, attention_bias=True, dtype="float32")


def formula_count(cfg: ModelConfig) -> int:
    """Independent count from the architecture's shapes."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = d * cfg.num_heads * h * 2 + d * cfg.num_kv_heads * h * 2
    if cfg.attention_bias:
        attn += (cfg.num_heads + 2 * cfg.num_kv_heads) * h
    if cfg.qk_norm:
        attn += 2 * h
    layer = attn + 3 * d * f + 2 * d
    embed = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
    return embed + cfg.num_layers * layer + d


@pytest.mark.parametrize("hf_config, published", [(LLAMA_31_8B, 8.03e9), (QWEN3_8B, 8.19e9)],
                         ids=["llama3.1-8b", "qwen3-8b"])
def test_full_size_param_counts(hf_config: dict, published: float) -> None:
    cfg = ModelConfig.from_hf_config(hf_config)
    n = llama.count_params(cfg)
    assert n == formula_count(cfg)
    assert abs(n - published) < 0.006e9, n
    abstract = llama.abstract_params(cfg)
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.dtype == jax.numpy.bfloat16
               for x in leaves)
    assert abstract["layers_0"]["attn"]["q_proj"]["kernel"].shape == (4096, 32, 128)
    assert ("lm_head" in abstract) == (not cfg.tie_word_embeddings)


def test_tied_embeddings_have_no_lm_head() -> None:
    cfg = TINY.replace(tie_word_embeddings=True)
    assert "lm_head" not in llama.abstract_params(cfg)
    assert llama.count_params(cfg) == formula_count(cfg)
    assert llama.count_params(TINY) == formula_count(TINY)


def test_logical_axes_match_params() -> None:
    axes = llama.param_logical_axes(TINY)
    abstract = llama.abstract_params(TINY)
    def is_axes(x: object) -> bool:
        return isinstance(x, tuple)

    flat_axes = jax.tree.leaves(axes, is_leaf=is_axes)
    assert jax.tree.structure(axes, is_leaf=is_axes) == jax.tree.structure(abstract)
    for names, leaf in zip(flat_axes, jax.tree.leaves(abstract), strict=True):
        assert len(names) == leaf.ndim
        assert all(n is None or n in LOGICAL_AXES for n in names)
    attn = axes["layers_0"]["attn"]
    assert attn["q_proj"]["kernel"] == ("embed", "q_heads", "head_dim")
    assert attn["k_proj"]["bias"] == ("kv_heads", "head_dim")
    assert attn["o_proj"]["kernel"] == ("q_heads", "head_dim", "embed")
    assert axes["embed"]["embedding"] == ("vocab", "embed")
    assert axes["lm_head"]["kernel"] == ("embed", "vocab")


def test_init_on_device_with_out_shardings() -> None:
    """jit(init_params, out_shardings=...) builds every param directly in its shards."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    rules = {"q_heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"}
    axes = llama.param_logical_axes(TINY)
    shardings = jax.tree.map(
        lambda names: jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(*(rules.get(n) for n in names))),
        axes, is_leaf=lambda x: isinstance(x, tuple))
    init = jax.jit(functools.partial(llama.init_params, TINY), out_shardings=shardings)
    params = init(jax.random.key(0))
    for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        assert p.sharding == s
    plain = jax.jit(functools.partial(llama.init_params, TINY))(jax.random.key(0))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    norms = params["layers_0"]["input_norm"]["scale"]
    np.testing.assert_array_equal(np.asarray(norms), 1.0)
    assert float(np.abs(np.asarray(params["layers_1"]["mlp"]["up_proj"]["kernel"])).max()) > 0
