"""sharding/replicas.py: each data replica's arrays are the loaded shards on its own devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from xlaserve.runtime.config import ParallelConfig
from xlaserve.sharding.mesh import make_mesh
from xlaserve.sharding.replicas import replica_meshes, take_replica


@pytest.mark.parametrize("dp,tp", [(2, 4), (4, 2), (8, 1)])
def test_each_replica_takes_its_rows_shards_without_a_copy(dp: int, tp: int) -> None:
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=tp, data_parallel_size=dp))
    x = np.arange(8 * 16, dtype=np.float32).reshape(8, 16)
    tree = {"split": jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "model"))),
            "rep": jax.device_put(x[0], NamedSharding(mesh, PartitionSpec()))}
    meshes = replica_meshes(mesh)
    assert len(meshes) == dp
    assert [list(m.devices.flat) for m in meshes] == [list(row) for row in mesh.devices]
    for sub in meshes:
        shardings = {"split": NamedSharding(sub, PartitionSpec(None, "model")),
                     "rep": NamedSharding(sub, PartitionSpec())}
        got = take_replica(tree, shardings)
        np.testing.assert_array_equal(np.asarray(got["split"]), x)
        np.testing.assert_array_equal(np.asarray(got["rep"]), x[0])
        assert got["split"].sharding.device_set == set(sub.devices.flat)
        loaded = {s.device: s.data.unsafe_buffer_pointer()
                  for s in tree["split"].addressable_shards}
        for s in got["split"].addressable_shards:
            assert s.data.shape == (8, 16 // tp)
            assert s.data.unsafe_buffer_pointer() == loaded[s.device]  # the same buffer


def test_a_replica_sharding_that_needs_other_slices_is_refused() -> None:
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=4, data_parallel_size=2))
    x = jax.device_put(np.zeros((8, 16), np.float32),
                       NamedSharding(mesh, PartitionSpec(None, "model")))
    sub = replica_meshes(mesh)[1]
    with pytest.raises(ValueError, match="does not hold the slice"):
        take_replica(x, NamedSharding(sub, PartitionSpec("model", None)))
    with pytest.raises(ValueError, match="axis_names"):
        replica_meshes(jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",)))
