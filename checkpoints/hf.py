"""Hugging Face checkpoints (config.json + safetensors) -> ModelConfig and params on the devices.

Weights go straight into their shards: every param is built with
``jax.make_array_from_callback``, whose callback reads only the requested slice of the tensor
from the safetensors file (``safe_open(..., framework="numpy").get_slice``). Host memory holds at
most one shard of one tensor at a time, never a copy of the model. bf16 tensors are read as
``ml_dtypes.bfloat16`` numpy arrays.

Each HF tensor maps to one of our params through a per-family table (`name_map`). A 2-D HF weight
W [out, in] becomes ``W.T.reshape(param_shape)`` (transpose=True); embeddings and norms keep
their layout. This module does not tokenize and does not know about meshes: shardings come in.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy so safetensors can return it)
import numpy as np
from safetensors import SafetensorError, safe_open

from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models import llama

INDEX_FILE = "model.safetensors.index.json"
# Checkpoint tensors that carry nothing we need (rope buffers some exporters keep).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# safetensors dtypes we cast to cfg.dtype. Anything else (I8, I32, U8, F8_E4M3, BOOL, ...) is
# quantized or corrupt data that a cast would turn into garbage weights.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """How one HF tensor becomes one of our params.

    Our param equals ``(W.T if transpose else W).reshape(param_shape)``, and the first `split`
    dims of param_shape come from axis 0 of that (possibly transposed) 2-D matrix, the rest from
    axis 1. For 1-D tensors `split` is the param's ndim.
    """

    hf_name: str
    transpose: bool
    split: int


# Per-layer tensors shared by every family: (our path under layers_{i}, HF name, transpose, split)
_LAYER_TABLE: tuple[tuple[tuple[str, ...], str, bool, int], ...] = (
    (("attn", "q_proj", "kernel"), "self_attn.q_proj.weight", True, 1),  # [N*H, D] -> [D, N, H]
    (("attn", "k_proj", "kernel"), "self_attn.k_proj.weight", True, 1),  # [K*H, D] -> [D, K, H]
    (("attn", "v_proj", "kernel"), "self_attn.v_proj.weight", True, 1),  # [K*H, D] -> [D, K, H]
    (("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", True, 2),  # [D, N*H] -> [N, H, D]
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", True, 1),  # [F, D] -> [D, F]
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", True, 1),  # [F, D] -> [D, F]
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", True, 1),  # [D, F] -> [F, D]
    (("input_norm", "scale"), "input_layernorm.weight", False, 1),  # [D]
    (("post_attn_norm", "scale"), "post_attention_layernorm.weight", False, 1),  # [D]
)
_BIAS_TABLE = (
    (("attn", "q_proj", "bias"), "self_attn.q_proj.bias", False, 2),  # [N*H] -> [N, H]
    (("attn", "k_proj", "bias"), "self_attn.k_proj.bias", False, 2),  # [K*H] -> [K, H]
    (("attn", "v_proj", "bias"), "self_attn.v_proj.bias", False, 2),  # [K*H] -> [K, H]
)
_O_BIAS_TABLE = (
    (("attn", "o_proj", "bias"), "self_attn.o_proj.bias", False, 1),  # [D]
)
_MLP_BIAS_TABLE = (
    (("mlp", "gate_proj", "bias"), "mlp.gate_proj.bias", False, 1),  # [F]
    (("mlp", "up_proj", "bias"), "mlp.up_proj.bias", False, 1),  # [F]
    (("mlp", "down_proj", "bias"), "mlp.down_proj.bias", False, 1),  # [D]
)
_QK_NORM_TABLE = (
    (("attn", "q_norm", "scale"), "self_attn.q_norm.weight", False, 1),  # [H]
    (("attn", "k_norm", "scale"), "self_attn.k_norm.weight", False, 1),  # [H]
)
# model_type -> extra per-layer tables beyond _LAYER_TABLE (also gated by the config switches).
FAMILY_TABLES: dict[str, tuple[tuple[tuple[str, ...], str, bool, int], ...]] = {
    "llama": _BIAS_TABLE + _O_BIAS_TABLE + _MLP_BIAS_TABLE,  # with attention_bias / mlp_bias
    "mistral": (),
    "qwen2": _BIAS_TABLE,
    "qwen3": _BIAS_TABLE + _O_BIAS_TABLE + _QK_NORM_TABLE,  # biases only with attention_bias
}
# Which config switch each bias path needs.
_BIAS_SWITCH = {"q_proj": "attention_bias", "k_proj": "attention_bias",
                "v_proj": "attention_bias", "o_proj": "o_proj_bias", "gate_proj": "mlp_bias",
                "up_proj": "mlp_bias", "down_proj": "mlp_bias"}


def name_map(cfg: ModelConfig) -> dict[tuple[str, ...], TensorSpec]:
    """Our param path (tuple of dict keys) -> the HF tensor it comes from, for this config."""
    if cfg.model_type not in FAMILY_TABLES:
        raise ValueError(f"model_type={cfg.model_type!r}: no name table "
                         f"(supported: {', '.join(FAMILY_TABLES)})")
    out: dict[tuple[str, ...], TensorSpec] = {
        ("embed", "embedding"): TensorSpec("model.embed_tokens.weight", False, 1),
        ("final_norm", "scale"): TensorSpec("model.norm.weight", False, 1)}
    if not cfg.tie_word_embeddings:
        out[("lm_head", "kernel")] = TensorSpec("lm_head.weight", True, 1)  # [V, D] -> [D, V]
    for path, name, transpose, split in _LAYER_TABLE + FAMILY_TABLES[cfg.model_type]:
        if path[-1] == "bias" and not getattr(cfg, _BIAS_SWITCH[path[-2]]):
            continue
        if "q_norm" in path or "k_norm" in path:
            if not cfg.qk_norm:
                continue
        for i in range(cfg.num_layers):
            out[(f"layers_{i}",) + path] = TensorSpec(f"model.layers.{i}.{name}", transpose,
                                                      split)
    return out


def read_hf_config(model_dir: pathlib.Path | str) -> dict[str, Any]:
    """The parsed config.json of a model directory (ValueError naming the file if absent)."""
    path = pathlib.Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"config.json not found in model directory {str(model_dir)!r}")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: must hold a JSON object, not {type(hf).__name__}")
    return hf


def _sliding_layers(hf: Mapping[str, Any], num_layers: int) -> int:
    """How many layers use the sliding window; ValueError if only some do (not supported)."""
    if hf.get("model_type") == "llama":
        return 0  # transformers' Llama never slides, whatever sliding_window says
    layer_types = hf.get("layer_types")
    if layer_types is None and hf.get("model_type") in ("qwen2", "qwen3"):
        # HF Qwen: layers i >= max_window_layers slide (when use_sliding_window is set); the
        # config classes default max_window_layers to 28.
        first = int(hf.get("max_window_layers", 28))
        layer_types = ["sliding_attention" if i >= first else "full_attention"
                       for i in range(num_layers)]
    if layer_types is None:
        return num_layers
    sliding = sum(t == "sliding_attention" for t in layer_types)
    if 0 < sliding < len(layer_types):
        raise ValueError(f"config.json layer_types={layer_types!r}: mixing sliding-window and "
                         f"full-attention layers is not supported")
    return sliding


def load_config(model_dir: pathlib.Path | str, *, dtype: str = "bfloat16") -> ModelConfig:
    """ModelConfig from config.json, with eos ids from generation_config.json when it has them."""
    hf = read_hf_config(model_dir)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"config.json hidden_act={act!r}: only silu is supported")
    cfg = ModelConfig.from_hf_config(hf, dtype=dtype)
    if cfg.model_type == "mistral" and "sliding_window" not in hf:
        cfg = cfg.replace(sliding_window=4096)  # MistralConfig's default (null turns it off)
    if cfg.sliding_window is not None and _sliding_layers(hf, cfg.num_layers) == 0:
        cfg = cfg.replace(sliding_window=None)  # the window is declared but no layer uses it
    gen_path = pathlib.Path(model_dir) / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        if eos is not None:
            eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)
            cfg = cfg.replace(eos_token_ids=eos_ids)
    return cfg


def _open(path: pathlib.Path) -> Any:
    """safe_open(path) with a ValueError naming the file when it is not a safetensors file (a
    git-lfs pointer from a clone without git-lfs, an interrupted download)."""
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as e:  # SafetensorError is no ValueError
        raise ValueError(f"{path}: not a readable safetensors file ({e}); is it fully "
                         f"downloaded (git-lfs pointer files are not weights)?") from e


def tensor_files(model_dir: pathlib.Path | str) -> dict[str, pathlib.Path]:
    """Tensor name -> the safetensors file holding it (from the index, or by opening the files)."""
    model_dir = pathlib.Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map: Mapping[str, str] = json.loads(index.read_text())["weight_map"]
        out = {}
        for name, fname in weight_map.items():
            path = model_dir / fname
            if not path.is_file():
                raise ValueError(f"{INDEX_FILE} lists shard file {fname!r} (for tensor {name!r}) "
                                 f"but it is missing from {str(model_dir)!r}")
            out[name] = path
        return out
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in model directory {str(model_dir)!r}")
    out = {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                out[name] = path
    return out


def _group_indices(dims: tuple[int, ...], slices: tuple[slice, ...]) -> tuple[np.ndarray, tuple]:
    """Flat (C-order) indices into a group of dims selected by `slices`, and the selected sizes."""
    ranges = [np.arange(*s.indices(d)) for d, s in zip(dims, slices, strict=True)]
    sizes = tuple(len(r) for r in ranges)
    if not dims:
        return np.zeros(1, np.int64), sizes
    grids = np.meshgrid(*ranges, indexing="ij")
    return np.ravel_multi_index(tuple(g.ravel() for g in grids), dims), sizes


def read_param_slice(handle: Any, spec: TensorSpec, param_shape: tuple[int, ...],
                     index: tuple[slice, ...], dtype: np.dtype) -> np.ndarray:
    """Reads only the part of the HF tensor that lands in `param[index]`; returns it as dtype."""
    index = tuple(index) + (slice(None),) * (len(param_shape) - len(index))
    idx0, sizes0 = _group_indices(param_shape[:spec.split], index[:spec.split])
    idx1, sizes1 = _group_indices(param_shape[spec.split:], index[spec.split:])
    r0 = slice(int(idx0.min()), int(idx0.max()) + 1) if idx0.size else slice(0, 0)
    r1 = slice(int(idx1.min()), int(idx1.max()) + 1) if idx1.size else slice(0, 0)
    view = handle.get_slice(spec.hf_name)
    if len(view.get_shape()) == 1:
        block = np.asarray(view[r0])[:, None]  # [rows, 1]
        r1 = slice(0, 1)
    elif spec.transpose:
        block = np.asarray(view[r1, r0]).T  # read W[out-range, in-range] then transpose
    else:
        block = np.asarray(view[r0, r1])
    # Covering ranges are exact unless a non-leading dim of a group is sliced; then pick rows.
    if idx0.size != r0.stop - r0.start:
        block = block[idx0 - r0.start]
    if idx1.size != r1.stop - r1.start:
        block = block[:, idx1 - r1.start]
    return np.ascontiguousarray(block.reshape(sizes0 + sizes1).astype(dtype))


def _expected_hf_shape(spec: TensorSpec, param_shape: tuple[int, ...]) -> tuple[int, ...]:
    a = int(np.prod(param_shape[:spec.split], dtype=np.int64))
    b = int(np.prod(param_shape[spec.split:], dtype=np.int64))
    if spec.split == len(param_shape):
        return (a * b,)
    return (b, a) if spec.transpose else (a, b)


def _path_keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def load_hf_params(model_dir: pathlib.Path | str, cfg: ModelConfig,
                   shardings: Any = None) -> llama.Params:
    """Loads a safetensors checkpoint into params of `cfg` (dtype cfg.dtype), shard by shard.

    Args:
      model_dir: the HF model directory.
      cfg: the ModelConfig (from `load_config`).
      shardings: None (first device), one jax.sharding.Sharding for every param, or a pytree of
        shardings with the params' structure.
    Raises:
      ValueError: a missing, unexpected, wrongly shaped or non-float tensor (names it and both
        shapes or its dtype), a missing or unreadable shard file, or a quantized checkpoint.
    """
    model_dir = pathlib.Path(model_dir)
    has_config = (model_dir / "config.json").is_file()
    quant = read_hf_config(model_dir).get("quantization_config") if has_config else None
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, Mapping) else quant
        raise ValueError(f"config.json quantization_config (quant_method={method!r}): quantized "
                         f"checkpoints are not supported; use the bf16/fp16/fp32 weights")
    abstract = llama.abstract_params(cfg)
    specs = name_map(cfg)
    where = tensor_files(model_dir)
    expected = {s.hf_name for s in specs.values()}
    missing = sorted(expected - where.keys())
    if missing:
        raise ValueError(f"checkpoint {str(model_dir)!r} is missing tensor(s) "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(n for n in where.keys() - expected
                        if n not in ignorable and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"checkpoint {str(model_dir)!r} has unexpected tensor(s) "
                         f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''} "
                         f"for model_type={cfg.model_type!r}")
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    flat_sh, sh_def = jax.tree.flatten(shardings)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    if sh_def != treedef:
        raise ValueError(f"shardings tree {sh_def} does not match the params tree {treedef}")
    dtype = jax.numpy.dtype(cfg.dtype)  # bfloat16 is ml_dtypes.bfloat16
    out = []
    for (path, leaf), sharding in zip(leaves, flat_sh, strict=True):
        keys = _path_keys(path)
        if keys not in specs:
            raise ValueError(f"param {'/'.join(keys)} has no entry in the name table")
        spec = specs[keys]
        # One tensor's file open at a time: the pages it maps leave host memory when it closes,
        # so the load peaks near one tensor, never the whole checkpoint (a re-open only parses
        # the small header).
        with _open(where[spec.hf_name]) as handle:
            if spec.hf_name not in handle.keys():
                raise ValueError(f"tensor {spec.hf_name} is not in {where[spec.hf_name]} (where "
                                 f"{INDEX_FILE} says it is)")
            view = handle.get_slice(spec.hf_name)
            hf_shape = tuple(view.get_shape())
            want = _expected_hf_shape(spec, tuple(leaf.shape))
            if hf_shape != want:
                raise ValueError(f"tensor {spec.hf_name} has shape {hf_shape}, expected {want} "
                                 f"(param {'/'.join(keys)} of shape {tuple(leaf.shape)})")
            if view.get_dtype() not in _FLOAT_DTYPES:
                raise ValueError(f"tensor {spec.hf_name} has dtype {view.get_dtype()}; only "
                                 f"{', '.join(_FLOAT_DTYPES)} weights are supported (quantized "
                                 f"checkpoints are not)")

            def callback(index: tuple[slice, ...] | None, handle: Any = handle,
                         spec: TensorSpec = spec,
                         shape: tuple[int, ...] = tuple(leaf.shape)) -> np.ndarray:
                if index is None:  # jax always passes the device's index (typed Optional)
                    raise ValueError(f"make_array_from_callback gave no index for "
                                     f"{spec.hf_name}")
                return read_param_slice(handle, spec, shape, index, dtype)

            # make_array_from_callback reads every device's slice now; then the file may close.
            out.append(jax.make_array_from_callback(leaf.shape, sharding, callback))
    return jax.tree.unflatten(treedef, out)
