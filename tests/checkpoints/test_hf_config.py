"""checkpoints/hf.load_config: config.json fields read with each HF family's own semantics."""

from __future__ import annotations

import json

import pytest

from xlaserve.checkpoints import hf

BASE = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}


@pytest.mark.parametrize("fields, window", [
    # transformers' LlamaAttention has no sliding window: a stray key (e.g. a Mistral model
    # re-labelled as llama) is ignored there, so full attention here too.
    ({"model_type": "llama", "sliding_window": 4096}, None),
    # MistralConfig defaults sliding_window to 4096 when config.json omits it; null turns it off.
    ({"model_type": "mistral"}, 4096),
    ({"model_type": "mistral", "sliding_window": None}, None),
    ({"model_type": "mistral", "sliding_window": 8}, 8),
    # Qwen2Config defaults max_window_layers to 28: layers 0..27 use full attention.
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8}, None),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
      "max_window_layers": 0}, 8),
])
def test_sliding_window_follows_transformers(tmp_path, fields: dict, window: int | None) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **fields}))
    assert hf.load_config(tmp_path).sliding_window == window


@pytest.mark.parametrize("fields, qkv, o, mlp", [
    # Qwen2Attention always has q/k/v biases and never an o_proj bias, whatever the config says.
    ({"model_type": "qwen2"}, True, False, False),
    ({"model_type": "qwen2", "attention_bias": False, "mlp_bias": True}, True, False, False),
    # Llama and Qwen3 put attention_bias on q, k, v and o; Llama alone reads mlp_bias.
    ({"model_type": "llama"}, False, False, False),
    ({"model_type": "llama", "attention_bias": True, "mlp_bias": True}, True, True, True),
    ({"model_type": "qwen3", "attention_bias": True, "mlp_bias": True}, True, True, False),
    # MistralAttention and MistralMLP have no biases.
    ({"model_type": "mistral", "attention_bias": True, "mlp_bias": True}, False, False, False),
])
def test_bias_switches_follow_transformers(tmp_path, fields: dict, qkv: bool, o: bool,
                                           mlp: bool) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **fields}))
    cfg = hf.load_config(tmp_path)
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.mlp_bias) == (qkv, o, mlp)
    biases = {path[-2] for path in hf.name_map(cfg) if path[-1] == "bias"}
    want = ({"q_proj", "k_proj", "v_proj"} if qkv else set()) | ({"o_proj"} if o else set())
    assert biases == want | ({"gate_proj", "up_proj", "down_proj"} if mlp else set())
