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
