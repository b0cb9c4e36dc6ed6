"""Tiny random-init Hugging Face models for tests (no network).

`make_hf_model(tmp_path, family)` builds a float32 transformers model of one supported family
with a fixed seed and saves it with `save_pretrained` (safetensors). Reused by the model,
checkpoint, engine and server tests.
"""

from __future__ import annotations

import pathlib
from typing import Any

FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "qwen3", "llama_bias", "qwen3_bias")

_COMMON: dict[str, Any] = dict(
    vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    # Wider than HF's 0.02 so logits are far from ties and greedy outputs vary.
    initializer_range=0.2,
)

# family -> (transformers config class name, model class name, config overrides)
_FAMILY_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_hidden_layers=3, tie_word_embeddings=True, eos_token_id=[2, 3],
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32),
        rope_theta=500000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0,
                                                     tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    # Biases on q/k/v/o (attention_bias) and on the MLP (mlp_bias), as some Llama fine-tunes.
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "qwen3_bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=32, tie_word_embeddings=False, attention_bias=True)),
}


def hf_config(family: str, **overrides: Any) -> Any:
    """The transformers config object for a tiny model of `family`."""
    import transformers

    if family not in _FAMILY_SPECS:
        raise ValueError(f"family={family!r}: must be one of {FAMILIES}")
    config_cls, _, extra = _FAMILY_SPECS[family]
    kwargs = {**_COMMON, **extra, **overrides}
    rope_scaling = kwargs.pop("rope_scaling", None)
    rope_theta = kwargs.pop("rope_theta", 10000.0)
    # transformers >= 5 folds theta and scaling into `rope_parameters`.
    kwargs["rope_parameters"] = {"rope_type": "default", **(rope_scaling or {}),
                                 "rope_theta": rope_theta}
    return getattr(transformers, config_cls)(**kwargs)


def make_hf_model(tmp_path: pathlib.Path | str, family: str, *, seed: int = 0,
                  max_shard_size: str | int | None = None, **overrides: Any) -> pathlib.Path:
    """Saves a tiny random-init float32 model of `family` under tmp_path/family; returns the dir.

    Args:
      family: one of FAMILIES.
      seed: torch seed for the random weights.
      max_shard_size: if set, the weights are split into several safetensors files plus
        model.safetensors.index.json. Qwen2 is sharded by default ("100KB").
      overrides: config fields to change (e.g. num_hidden_layers=4).
    """
    import torch
    import transformers

    cfg = hf_config(family, **overrides)
    _, model_cls, _ = _FAMILY_SPECS[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).to(torch.float32).eval()
    # Norm weights start at 1 and biases at 0; randomize them so the parity tests see them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    if max_shard_size is None and family == "qwen2":
        max_shard_size = "100KB"
    out = pathlib.Path(tmp_path) / family
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **kwargs)
    return out


def load_hf_model(path: pathlib.Path | str) -> Any:
    """Loads a saved tiny model back with transformers (float32, eval mode)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32).eval()
