"""Random weights for any config ("--load-format dummy"), generated on the devices.

Only the config is needed: a directory holding just config.json (or a converted xlaserve dir) is
enough. The values come from a counter-based integer hash of (seed, parameter index, element
index), computed by one jitted program with `out_shardings`, so each device writes its own shard:
no host randomness, no host copy, and a tiny program (iota, a few integer ops and a scale per
parameter). That keeps an 8B model at a write of its 16 GB rather than the compile and run of
`llama.init_params` (a flax init with threefry normal draws for every parameter, which took
84-89 s for the 8B shape on an H100).

The values are uniform with the std of `llama.init_params` (0.02 for kernels and embeddings),
norm scales are 1 and biases 0, so activations stay in range. They are not the same numbers as
`init_params` draws; they are the same for a given (config, seed) on any device layout.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models import llama

KERNEL_STD = 0.02  # the std of llama.init_params' kernel and embedding initializers
_UNIFORM_STD = 1.0 / np.sqrt(12.0)  # std of U(-0.5, 0.5)


def _hash_uniform(shape: tuple[int, ...], dtype: Any, salt: int, std: float) -> jax.Array:
    """U(-0.5, 0.5) * std / _UNIFORM_STD from an integer hash of the element index and `salt`."""
    n = int(np.prod(shape))
    if n >= 2 ** 32:
        raise ValueError(f"shape={shape}: {n} elements is more than a 32-bit index can hash")
    x = jax.lax.iota(jnp.uint32, n) * jnp.uint32(0x9E3779B1) + jnp.uint32(salt & 0xFFFFFFFF)
    # A murmur3-style finalizer: good bit mixing at a few integer ops per element.
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    x = x ^ (x >> 16)
    u = (x >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24) - 0.5
    return (u * (std / _UNIFORM_STD)).astype(dtype).reshape(shape)


def _dummy_values(cfg: ModelConfig, seed: int) -> llama.Params:
    flat, treedef = jax.tree_util.tree_flatten_with_path(llama.abstract_params(cfg))
    leaves = []
    for i, (path, leaf) in enumerate(flat):
        name = jax.tree_util.keystr(path)
        if "norm" in name:  # RMSNorm scales
            leaves.append(jnp.ones(leaf.shape, leaf.dtype))
        elif name.endswith("['bias']"):
            leaves.append(jnp.zeros(leaf.shape, leaf.dtype))
        else:
            salt = (seed * 0x27D4EB2F + i * 0x165667B1) & 0xFFFFFFFF
            leaves.append(_hash_uniform(leaf.shape, leaf.dtype, salt, KERNEL_STD))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def dummy_params(cfg: ModelConfig, *, shardings: Any = None, seed: int = 0) -> llama.Params:
    """Random-looking params of `cfg` made on device (see the module docstring).

    Args:
      cfg: the model config (cfg.dtype is the params' dtype).
      shardings: None (first device), one jax.sharding.Sharding for every param, or a pytree of
        shardings with the params' structure.
      seed: selects the values; the same (cfg, seed) gives the same params.
    """
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # jit a module-level function with cfg and seed static, so a second load of the same config
    # and shardings reuses jax's compilation cache.
    make = jax.jit(_dummy_values, static_argnums=(0, 1), out_shardings=shardings)
    return make(cfg, int(seed))
