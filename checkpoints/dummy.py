"""Random weights for any config ("--load-format dummy"), generated on the devices.

The params are created by a jitted `init_params` with `out_shardings`, so each device draws its
own shard: no host randomness and no host copy (seconds even for an 8B model). Only the config
is needed: a directory holding just config.json (or a converted xlaserve dir) is enough.
"""

from __future__ import annotations

from typing import Any

import jax

from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models import llama


def dummy_params(cfg: ModelConfig, *, shardings: Any = None, seed: int = 0) -> llama.Params:
    """Random params of `cfg` made on device.

    Args:
      cfg: the model config (cfg.dtype is the params' dtype).
      shardings: None (first device), one jax.sharding.Sharding for every param, or a pytree of
        shardings with the params' structure.
      seed: PRNG seed.
    """
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # jit the module-level function with cfg static (not a fresh partial), so a second load of
    # the same config and shardings reuses jax's compilation cache.
    init = jax.jit(llama.init_params, static_argnums=0, out_shardings=shardings)
    return init(cfg, jax.random.key(seed))
