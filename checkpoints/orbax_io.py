"""xlaserve's own checkpoint form: a directory with our ModelConfig as JSON and orbax params.

Layout of a converted directory::

    xlaserve_model.json     {"format": "xlaserve-orbax", "version": 1, "model_config": {...}}
    params/                 orbax StandardCheckpointer tree (same structure as llama params)
    config.json, tokenizer files, generation_config.json   copied from the HF source

Restoring reads every array straight onto its target sharding (no host-side full copy). This
module does not convert names (checkpoints/hf.py does) and does not pick shardings.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax

from xlaserve.runtime.config import ModelConfig, RopeScaling
from xlaserve.runtime.models import llama

MARKER_FILE = "xlaserve_model.json"
PARAMS_DIR = "params"
FORMAT = "xlaserve-orbax"
VERSION = 1


def is_orbax_dir(path: pathlib.Path | str) -> bool:
    """True when `path` is a directory written by `save`."""
    return (pathlib.Path(path) / MARKER_FILE).is_file()


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """ModelConfig -> JSON-able dict (inverse of `config_from_dict`)."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """Dict written by `config_to_dict` -> ModelConfig (ValueError on unknown fields)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"model_config has unknown field(s) {unknown}")
    d = dict(d)
    d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
    d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
    return ModelConfig(**d)


def load_config(path: pathlib.Path | str) -> ModelConfig:
    """The ModelConfig stored in a converted directory."""
    marker = pathlib.Path(path) / MARKER_FILE
    if not marker.is_file():
        raise ValueError(f"{MARKER_FILE} not found in {str(path)!r}: not an xlaserve orbax dir")
    meta = json.loads(marker.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{marker}: format={meta.get('format')!r} version="
                         f"{meta.get('version')!r}, expected {FORMAT!r} version {VERSION}")
    return config_from_dict(meta["model_config"])


def save(path: pathlib.Path | str, cfg: ModelConfig, params: llama.Params) -> pathlib.Path:
    """Writes cfg and params under `path` (created; must not already hold params)."""
    path = pathlib.Path(path).absolute()
    if (path / PARAMS_DIR).exists():
        raise ValueError(f"output={str(path)!r} already holds {PARAMS_DIR}/; choose a new dir")
    expected = jax.tree.structure(llama.abstract_params(cfg))
    if jax.tree.structure(params) != expected:
        raise ValueError(f"params tree {jax.tree.structure(params)} does not match the "
                         f"config's params tree {expected}")
    path.mkdir(parents=True, exist_ok=True)
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    meta = {"format": FORMAT, "version": VERSION, "model_config": config_to_dict(cfg)}
    (path / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def restore(path: pathlib.Path | str, *, shardings: Any = None,
            dtype: str | None = None) -> tuple[ModelConfig, llama.Params]:
    """Reads a converted directory straight onto `shardings`.

    Args:
      path: a directory written by `save`.
      shardings: None (first device), one Sharding for every param, or a pytree of shardings
        with the params' structure.
      dtype: cast to this dtype while restoring (default: the saved dtype).
    Returns:
      (config with dtype set, params).
    """
    path = pathlib.Path(path).absolute()
    cfg = load_config(path)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    abstract = llama.abstract_params(cfg)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    if jax.tree.structure(shardings) != jax.tree.structure(abstract):
        raise ValueError(f"shardings tree {jax.tree.structure(shardings)} does not match the "
                         f"params tree {jax.tree.structure(abstract)}")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(path / PARAMS_DIR, target)
    return cfg, params
