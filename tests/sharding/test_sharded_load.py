"""Loading straight onto the mesh: HF safetensors slice by slice, orbax restore onto shardings,
and the peak host memory of a sharded load (measured in a fresh subprocess)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from xlaserve.checkpoints import loader, orbax_io
from xlaserve.runtime.config import ParallelConfig
from xlaserve.sharding.mesh import make_mesh
from xlaserve.sharding.specs import ShardingPlan, make_shardings_fn


def write_hf_checkpoint(model_dir: pathlib.Path, *, hidden: int, inter: int, layers: int,
                        heads: int, kv_heads: int, head_dim: int, vocab: int,
                        layers_per_file: int, seed: int = 0) -> list[pathlib.Path]:
    """A random float32 Llama checkpoint in HF layout, split over several safetensors files
    with a model.safetensors.index.json. Returns the shard files."""
    model_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(np.float32)

    groups: list[dict[str, np.ndarray]] = [{
        "model.embed_tokens.weight": w(vocab, hidden),
        "model.norm.weight": np.ones(hidden, np.float32),
        "lm_head.weight": w(vocab, hidden),
    }]
    for first in range(0, layers, layers_per_file):
        group = {}
        for i in range(first, min(first + layers_per_file, layers)):
            p = f"model.layers.{i}."
            group[p + "self_attn.q_proj.weight"] = w(heads * head_dim, hidden)
            group[p + "self_attn.k_proj.weight"] = w(kv_heads * head_dim, hidden)
            group[p + "self_attn.v_proj.weight"] = w(kv_heads * head_dim, hidden)
            group[p + "self_attn.o_proj.weight"] = w(hidden, heads * head_dim)
            group[p + "mlp.gate_proj.weight"] = w(inter, hidden)
            group[p + "mlp.up_proj.weight"] = w(inter, hidden)
            group[p + "mlp.down_proj.weight"] = w(hidden, inter)
            group[p + "input_layernorm.weight"] = 1 + w(hidden)
            group[p + "post_attention_layernorm.weight"] = 1 + w(hidden)
        groups.append(group)
    files, weight_map = [], {}
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(model_dir / name))
        files.append(model_dir / name)
        weight_map.update({t: name for t in group})
        del group
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "float32"}))
    return files


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("tiny_hf")
    write_hf_checkpoint(d, hidden=64, inter=128, layers=2, heads=8, kv_heads=2, head_dim=16,
                        vocab=256, layers_per_file=1)
    return d


@pytest.mark.parametrize("dp,tp", [(1, 4), (2, 4), (1, 8)])
def test_hf_load_onto_mesh_equals_unsharded(tiny_dir: pathlib.Path, dp: int, tp: int) -> None:
    full = loader.load_model(str(tiny_dir), dtype="float32")
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=tp, data_parallel_size=dp))
    sharded = loader.load_model(str(tiny_dir), dtype="float32",
                                shardings_fn=make_shardings_fn(mesh))
    plan = ShardingPlan.create(sharded.config, ParallelConfig(tp, dp), mesh=mesh)
    for got, want, sh in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(full.params),
                             jax.tree.leaves(plan.param_shardings)):
        assert got.sharding.is_equivalent_to(sh, got.ndim)
        for shard in got.addressable_shards:  # each device holds exactly its slice
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want)[shard.index])
    q = sharded.params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == (64, 8 // tp, 16)


def test_orbax_restore_onto_mesh(tiny_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    full = loader.load_model(str(tiny_dir), dtype="float32")
    orbax_io.save(tmp_path / "conv", full.config, full.params)
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=4, data_parallel_size=2))
    restored = loader.load_model(str(tmp_path / "conv"), load_format="orbax", dtype="float32",
                                 shardings_fn=make_shardings_fn(mesh))
    plan = ShardingPlan.create(restored.config, ParallelConfig(4, 2), mesh=mesh)
    for got, want, sh in zip(jax.tree.leaves(restored.params), jax.tree.leaves(full.params),
                             jax.tree.leaves(plan.param_shardings)):
        assert got.sharding.is_equivalent_to(sh, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# Runs in a fresh interpreter so the peak reflects the load only. The peak is the RSS high-water
# mark: VmHWM in /proc/self/status, reset after imports and device start-up by writing "5" to
# /proc/self/clear_refs, so the baseline is the RSS right before the load. ru_maxrss is reported
# too but not used: it also folds in the peak of the process image replaced by exec (here, the
# pytest parent that wrote the checkpoint) and cannot be reset.
_CHILD = textwrap.dedent("""
    import json, resource, sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from xlaserve.checkpoints import loader
    from xlaserve.runtime.config import ParallelConfig
    from xlaserve.runtime.models import llama
    from xlaserve.sharding.mesh import make_mesh
    from xlaserve.sharding.specs import make_shardings_fn, param_shardings

    def hwm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    model_dir, mode = sys.argv[1], sys.argv[2]
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=8))
    cfg = loader.load_model_config(loader.resolve_model_dir(model_dir), dtype="float32")
    llama.abstract_params(cfg); param_shardings(cfg, mesh)  # trace once before the baseline
    warm = jax.make_array_from_callback((8, 256), NamedSharding(mesh, PartitionSpec("model")),
                                        lambda idx: np.ones((1, 256), np.float32))
    jax.block_until_ready(warm)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base_hwm = hwm_bytes()
    keep = None
    if mode == "full_copy":  # negative control: a whole host copy of the model
        import glob
        from safetensors.numpy import load_file
        keep = [load_file(f) for f in sorted(glob.glob(model_dir + "/*.safetensors"))]
    loaded = loader.load_model(model_dir, dtype="float32", shardings_fn=make_shardings_fn(mesh))
    jax.block_until_ready(loaded.params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    held = sum(s.data.nbytes for a in jax.tree.leaves(loaded.params)
               for s in a.addressable_shards)
    print(json.dumps({"base": base, "peak": peak, "held": held, "base_hwm": base_hwm,
                      "peak_hwm": hwm_bytes()}))
""")


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, int, int]:
    """~200 MiB float32 checkpoint in 7 files (largest 32 MiB); (dir, largest, total) bytes."""
    d = tmp_path_factory.mktemp("big_hf")
    files = write_hf_checkpoint(d, hidden=512, inter=2048, layers=12, heads=8, kv_heads=8,
                                head_dim=64, vocab=4096, layers_per_file=2)
    sizes = [f.stat().st_size for f in files]
    return d, max(sizes), sum(sizes)


def _measure_load(model_dir: pathlib.Path, mode: str) -> dict[str, int]:
    # On CPU the "device" buffers live in the host heap, between the loader's short-lived slice
    # buffers; glibc's dynamic mmap threshold then leaves the freed slices as heap holes it
    # cannot return (~15% of the model here), an artefact of fake CPU devices, not of the
    # loader. A fixed threshold gives every large buffer its own mapping, so the peak shows what
    # the loader holds. (On a GPU the device buffers are not in the host heap at all.)
    env = dict(os.environ, JAX_PLATFORMS="cpu", MALLOC_MMAP_THRESHOLD_="65536",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    res = subprocess.run([sys.executable, "-c", _CHILD, str(model_dir), mode], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sharded_load_peak_host_memory(big_dir: tuple[pathlib.Path, int, int]) -> None:
    """Peak RSS above baseline, less the loaded shards themselves (on CPU the device buffers are
    host memory), stays below 1.2x the largest shard file. A loader that materialised the whole
    model (or kept every file's pages mapped) would add the full ~200 MiB checkpoint."""
    model_dir, largest, total = big_dir
    assert total > 4 * largest  # a full copy would blow the bound
    m = _measure_load(model_dir, "load")
    assert m["held"] >= total * 0.95  # tp=8 over 8 devices: about one model's worth in total
    overhead = m["peak_hwm"] - m["base_hwm"] - m["held"]
    print(f"largest shard {largest / 2**20:.1f} MiB, total {total / 2**20:.1f} MiB, "
          f"peak-base {(m['peak_hwm'] - m['base_hwm']) / 2**20:.1f} MiB, "
          f"held {m['held'] / 2**20:.1f} MiB, overhead {overhead / 2**20:.1f} MiB")
    assert overhead < 1.2 * largest, (
        f"loading overhead {overhead / 2**20:.1f} MiB >= 1.2 x largest shard file "
        f"{largest / 2**20:.1f} MiB")


@pytest.mark.slow
def test_peak_memory_measure_catches_a_full_copy(big_dir: tuple[pathlib.Path, int, int]) -> None:
    """Negative control: the same measurement flags a load that keeps a whole host copy."""
    model_dir, largest, _ = big_dir
    m = _measure_load(model_dir, "full_copy")
    assert m["peak_hwm"] - m["base_hwm"] - m["held"] > 1.2 * largest
