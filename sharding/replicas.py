"""Data parallelism: one model replica per row of the ``("data", "model")`` mesh.

The model is loaded once onto the whole mesh (split over ``model``, replicated over ``data``).
Each replica then takes its row's shards as arrays of its own ``1 x tp`` mesh: the same device
buffers, no copy and no host round trip. Every replica runs its own engine on its own batch
(runtime/data_parallel.py); nothing here knows about requests.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from xlaserve.sharding.mesh import DATA_AXIS, MODEL_AXIS


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """The ``1 x tp`` mesh of each row (data index) of a ``data x tp`` mesh, in row order."""
    if tuple(mesh.axis_names) != (DATA_AXIS, MODEL_AXIS):
        raise ValueError(f"mesh axis_names={tuple(mesh.axis_names)}: must be "
                         f"({DATA_AXIS!r}, {MODEL_AXIS!r})")
    return [Mesh(mesh.devices[r:r + 1], mesh.axis_names) for r in range(mesh.shape[DATA_AXIS])]


def take_replica(tree: Any, shardings: Any) -> Any:
    """`tree`'s arrays as arrays laid out by `shardings`, whose devices are a subset of theirs.

    Args:
      tree: jax arrays on a ``data x tp`` mesh, replicated over ``data``.
      shardings: a matching tree of NamedShardings on one row's ``1 x tp`` mesh, with the same
        PartitionSpecs (so each of those devices already holds the shard it needs).
    Returns:
      The same tree; each array shares its buffers with the input's shards on those devices.
    Raises:
      ValueError: a device of `shardings` does not hold the slice of the array that `shardings`
        puts on it.
    """
    def one(array: jax.Array, sharding: NamedSharding) -> jax.Array:
        shards = {s.device: s for s in array.addressable_shards}
        want = sharding.devices_indices_map(array.shape)
        bufs = []
        for device, index in want.items():
            shard = shards.get(device)
            if shard is None or shard.index != index:
                raise ValueError(f"array {array.shape} on {array.sharding}: {device} does not "
                                 f"hold the slice {index} that {sharding.spec} puts there")
            bufs.append(shard.data)
        return jax.make_array_from_single_device_arrays(array.shape, sharding, bufs)

    return jax.tree.map(one, tree, shardings)
