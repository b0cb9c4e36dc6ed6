"""Device meshes for tensor and data parallelism, built from a `ParallelConfig`.

The mesh always has two axes, ``("data", "model")``, of sizes ``data_parallel_size`` and
``tensor_parallel_size``. Parameters and the KV cache are split over ``model`` (see rules.py);
everything is replicated over ``data``. The engine loads the model once onto the whole mesh and
then runs one replica per row (sharding/replicas.py, runtime/data_parallel.py): each row's
devices serve their own requests, so ``data`` > 1 adds throughput.

This module validates sizes against the visible devices and the model; it never touches params.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from xlaserve.runtime.config import ModelConfig, ParallelConfig

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)


def validate_devices(parallel: ParallelConfig, num_devices: int) -> None:
    """Raises ValueError when data x model does not fit (or does not divide) the device count."""
    world = parallel.world_size
    if world > num_devices:
        raise ValueError(
            f"tensor_parallel_size={parallel.tensor_parallel_size} x data_parallel_size="
            f"{parallel.data_parallel_size} = {world} devices, but only {num_devices} are "
            f"visible")
    if num_devices % world:
        raise ValueError(
            f"tensor_parallel_size={parallel.tensor_parallel_size} x data_parallel_size="
            f"{parallel.data_parallel_size} = {world} does not divide the {num_devices} visible "
            f"devices; restrict them (e.g. CUDA_VISIBLE_DEVICES) or change the sizes")


def validate_model(parallel: ParallelConfig, model_cfg: ModelConfig) -> None:
    """Raises ValueError naming the model field that tensor_parallel_size does not divide.

    q heads, vocab and the MLP width are split over ``model`` and must divide evenly. KV heads
    are split when tp divides them; when tp exceeds them, tp must be a multiple of them: the KV
    projections are replicated and each device stores a copy of the one KV head its q heads read
    (`rules.kv_cache_heads`). Any other combination cannot give each device whole q-head groups
    and is refused.
    """
    tp = parallel.tensor_parallel_size
    for field in ("num_heads", "vocab_size", "intermediate_size"):
        value = getattr(model_cfg, field)
        if value % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the model's "
                             f"{field}={value}")
    k = model_cfg.num_kv_heads
    if k % tp and tp % k:
        raise ValueError(
            f"tensor_parallel_size={tp} and the model's num_kv_heads={k}: tp must divide the "
            f"KV heads (split) or be a multiple of them (one KV head per device)")


def validate_parallel(parallel: ParallelConfig, model_cfg: ModelConfig | None,
                      num_devices: int) -> None:
    """All checks of a parallel layout against the devices and (when given) the model.

    Args:
      parallel: the requested mesh sizes.
      model_cfg: the model to split, or None to check the devices only.
      num_devices: devices visible to this process (``len(jax.devices())``).
    Raises:
      ValueError: naming the field (tensor_parallel_size, data_parallel_size, num_heads,
        num_kv_heads, vocab_size, intermediate_size) and its value.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices={num_devices}: must be >= 1")
    validate_devices(parallel, num_devices)
    if model_cfg is not None:
        validate_model(parallel, model_cfg)


def make_mesh(parallel: ParallelConfig,
              # jax.Device is jaxlib's compiled class, which has no stub: pyright sees a variable
              devices: Sequence[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
              model_cfg: ModelConfig | None = None) -> Mesh:
    """Builds the ``("data", "model")`` mesh over the first data x model devices.

    Devices are taken in id order and laid out row-major, so the devices of one model group are
    consecutive (on one NVLink host every pair is equally close, so no topology search is done).

    Args:
      parallel: tensor_parallel_size (the ``model`` axis) and data_parallel_size (``data``).
      devices: devices to use; default ``jax.devices()``.
      model_cfg: when given, also checked against the sizes (heads, KV heads, vocab, MLP).
    Returns:
      A Mesh of shape (data_parallel_size, tensor_parallel_size).
    Raises:
      ValueError: the sizes do not fit the devices or the model.
    """
    devs = list(jax.devices() if devices is None else devices)
    validate_parallel(parallel, model_cfg, len(devs))
    devs.sort(key=lambda d: d.id)
    grid = np.array(devs[:parallel.world_size], dtype=object).reshape(
        parallel.data_parallel_size, parallel.tensor_parallel_size)
    return Mesh(grid, MESH_AXES)
