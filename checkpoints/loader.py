"""One entry point for every model source: an HF directory, a converted (orbax) directory, or
"builtin:NAME". Returns the config, the params on the devices, and the model directory (where the
tokenizer files live).

load_format: "auto" (orbax dir if it has our marker file, else safetensors), "safetensors",
"orbax", or "dummy" (random weights on device for the directory's config). This module decides
nothing about meshes: `shardings_fn(cfg)` supplies the shardings.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

from xlaserve.checkpoints import dummy, hf, orbax_io
from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models import llama

LOAD_FORMATS = ("auto", "safetensors", "orbax", "dummy")
BUILTIN_PREFIX = "builtin:"


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready for the runner."""

    config: ModelConfig  # the decoder's shapes and numerics (dtype = the params' dtype)
    params: llama.Params  # nested dict of jax arrays, placed on the given shardings
    model_dir: pathlib.Path  # directory with config.json and tokenizer files


def resolve_model_dir(model: str) -> pathlib.Path:
    """`model` (a path or builtin:NAME) -> an existing directory; ValueError naming `model`."""
    if model.startswith(BUILTIN_PREFIX):
        name = model[len(BUILTIN_PREFIX):]
        from xlaserve.checkpoints import builtin

        try:
            return pathlib.Path(builtin.builtin_model_dir(name))
        except (KeyError, ValueError) as e:
            raise ValueError(f"model={model!r}: unknown builtin model ({e})") from e
    path = pathlib.Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"model={model!r}: no such directory (expected an HF model directory, "
                         f"a converted xlaserve directory, or builtin:NAME)")
    return path


def load_model_config(model_dir: pathlib.Path, *, dtype: str = "bfloat16") -> ModelConfig:
    """The config of an orbax (ours) or HF directory, with `dtype`."""
    if orbax_io.is_orbax_dir(model_dir):
        return orbax_io.load_config(model_dir).replace(dtype=dtype)
    return hf.load_config(model_dir, dtype=dtype)


def load_model(model: str, *, load_format: str = "auto", dtype: str = "bfloat16",
               shardings_fn: Callable[[ModelConfig], Any] | None = None,
               seed: int = 0) -> LoadedModel:
    """Loads config and params from `model`.

    Args:
      model: an HF directory, a converted xlaserve directory, or "builtin:NAME".
      load_format: auto | safetensors | orbax | dummy.
      dtype: params dtype (bfloat16, float16, float32).
      shardings_fn: cfg -> pytree of shardings (params' structure), one Sharding, or None
        (first device). Params are created directly on these shardings.
      seed: PRNG seed for load_format="dummy".
    Raises:
      ValueError: unknown model, unknown load_format, or a broken checkpoint.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format={load_format!r}: must be one of {LOAD_FORMATS}")
    model_dir = resolve_model_dir(model)
    is_orbax = orbax_io.is_orbax_dir(model_dir)
    if load_format == "auto":
        load_format = "orbax" if is_orbax else "safetensors"
    if load_format == "orbax" and not is_orbax:
        raise ValueError(f"model={model!r}: load_format='orbax' but {orbax_io.MARKER_FILE} "
                         f"is missing")
    cfg = load_model_config(model_dir, dtype=dtype)
    shardings = shardings_fn(cfg) if shardings_fn is not None else None
    if load_format == "dummy":
        params = dummy.dummy_params(cfg, shardings=shardings, seed=seed)
    elif load_format == "orbax":
        cfg, params = orbax_io.restore(model_dir, shardings=shardings, dtype=dtype)
    else:
        params = hf.load_hf_params(model_dir, cfg, shardings)
    return LoadedModel(config=cfg, params=params, model_dir=model_dir)
