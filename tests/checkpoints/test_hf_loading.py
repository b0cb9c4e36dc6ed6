"""checkpoints/hf.py: name mapping, sharded files, slice-only reads, meshes, bf16, eos ids."""

from __future__ import annotations

import hf_models
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xlaserve.checkpoints import hf
from xlaserve.runtime.models import llama

torch = pytest.importorskip("torch")


def torch_params(path) -> dict[str, np.ndarray]:
    model = hf_models.load_hf_model(path)
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def expected_param(sd: dict[str, np.ndarray], spec: hf.TensorSpec, shape) -> np.ndarray:
    w = sd[spec.hf_name]
    return (w.T if spec.transpose else w).reshape(shape)


@pytest.mark.hf
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama3", "llama_bias"])
def test_params_equal_the_torch_weights(tmp_path, family: str) -> None:
    path = hf_models.make_hf_model(tmp_path, family)
    cfg = hf.load_config(path, dtype="float32")
    params = hf.load_hf_params(path, cfg)
    sd = torch_params(path)
    specs = hf.name_map(cfg)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    assert len(flat) == len(specs)
    for key_path, leaf in flat:
        keys = tuple(k.key for k in key_path)
        np.testing.assert_array_equal(np.asarray(leaf),
                                      expected_param(sd, specs[keys], leaf.shape),
                                      err_msg="/".join(keys))
    if family == "qwen2":  # saved as several shards with an index
        assert (path / hf.INDEX_FILE).is_file()
        assert len(list(path.glob("*.safetensors"))) > 1


@pytest.mark.hf
def test_generation_config_eos_ids(tmp_path) -> None:
    path = hf_models.make_hf_model(tmp_path, "llama3")
    cfg = hf.load_config(path)
    assert cfg.eos_token_ids == (2, 3)
    assert cfg.tie_word_embeddings and cfg.rope_scaling.rope_type == "llama3"
    assert cfg.dtype == "bfloat16"


@pytest.mark.hf
@pytest.mark.parametrize("family", ["qwen2", "llama_bias"])  # sharded files; every bias
def test_load_straight_onto_a_mesh(tmp_path, family: str) -> None:
    """Every shard equals the same slice of a single-device load (incl. head_dim-split slices)."""
    path = hf_models.make_hf_model(tmp_path, family)
    cfg = hf.load_config(path, dtype="float32")
    ref = hf.load_hf_params(path, cfg)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    axes = llama.param_logical_axes(cfg)
    # Unusual on purpose: head_dim over "model" makes non-contiguous reads of q/k/v/o weights.
    rules = {"q_heads": "data", "kv_heads": "data", "head_dim": "model", "mlp": "model",
             "vocab": "model", "embed": None}
    shardings = jax.tree.map(lambda names: NamedSharding(mesh, P(*(rules.get(n) for n in names))),
                             axes, is_leaf=lambda x: isinstance(x, tuple))
    params = hf.load_hf_params(path, cfg, shardings)
    for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(ref),
                       jax.tree.leaves(shardings), strict=True):
        assert a.sharding == s
        for shard in a.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(b)[shard.index])


@pytest.mark.hf
def test_bf16_checkpoint(tmp_path) -> None:
    src = hf_models.make_hf_model(tmp_path, "llama2")
    model = hf_models.load_hf_model(src).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    path = tmp_path / "bf16"
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    cfg32 = hf.load_config(path, dtype="float32")
    p32 = hf.load_hf_params(path, cfg32)
    spec = hf.name_map(cfg32)[("layers_1", "attn", "o_proj", "kernel")]
    got = p32["layers_1"]["attn"]["o_proj"]["kernel"]
    np.testing.assert_array_equal(np.asarray(got), expected_param(sd, spec, got.shape))
    p16 = hf.load_hf_params(path, hf.load_config(path))
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(p16))
    np.testing.assert_array_equal(np.asarray(p16["embed"]["embedding"]).astype(np.float32),
                                  sd["model.embed_tokens.weight"])


class _RecordingHandle:
    """A safe_open stand-in over an in-memory array that records every slice read."""

    class _View:
        def __init__(self, arr: np.ndarray, log: list) -> None:
            self.arr, self.log = arr, log

        def get_shape(self) -> list[int]:
            return list(self.arr.shape)

        def __getitem__(self, idx):
            out = self.arr[idx]
            self.log.append(out.size)
            return out

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays, self.log = arrays, []

    def get_slice(self, name: str) -> _View:
        return self._View(self.arrays[name], self.log)


@pytest.mark.parametrize("transpose, split, shape", [
    (True, 1, (6, 4, 5)),  # q_proj-like [D, N, H] from [N*H, D]
    (True, 2, (4, 5, 6)),  # o_proj-like [N, H, D] from [D, N*H]
    (False, 1, (10, 6)),  # embedding
    (False, 2, (4, 5)),  # bias [N, H] from [N*H]
])
def test_read_param_slice_reads_only_the_slice(transpose: bool, split: int, shape) -> None:
    rng = np.random.RandomState(0)
    full = rng.randn(*shape).astype(np.float32)
    a = int(np.prod(shape[:split]))
    b = int(np.prod(shape[split:]))
    hf_array = full.reshape(a, b).T.copy() if transpose else full.reshape(a, b).reshape(
        (a,) if split == len(shape) else (a, b))
    handle = _RecordingHandle({"w": hf_array})
    spec = hf.TensorSpec("w", transpose, split)
    for _ in range(20):
        index = []
        for d in shape:
            lo = rng.randint(0, d)
            index.append(slice(lo, rng.randint(lo + 1, d + 1)))
        index = tuple(index)
        handle.log.clear()
        got = hf.read_param_slice(handle, spec, shape, index, np.dtype("float32"))
        np.testing.assert_array_equal(got, full[index])
        # Contiguous-leading slices read exactly what they need; at most the covering rows.
        assert sum(handle.log) <= full.size
        if all(s == slice(0, d) for s, d in zip(index[1:], shape[1:])):
            assert sum(handle.log) == got.size
    got = hf.read_param_slice(handle, spec, shape, (), np.dtype("float16"))
    assert got.dtype == np.float16 and got.shape == shape
