"""One test per kind of broken checkpoint; each error names the tensor, field or file (+ shapes)."""

from __future__ import annotations

import json
import re

import hf_models
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from xlaserve.checkpoints import hf, loader

pytestmark = pytest.mark.hf
pytest.importorskip("torch")

Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture
def llama_dir(tmp_path):
    return hf_models.make_hf_model(tmp_path, "llama2")


def rewrite(path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(llama_dir) -> None:
    rewrite(llama_dir, lambda t: t.pop(Q0))
    with pytest.raises(ValueError, match=re.escape(f"missing tensor(s) {Q0}")):
        loader.load_model(str(llama_dir))


def test_unexpected_tensor(llama_dir) -> None:
    extra = "model.layers.1.mlp.extra_proj.weight"
    rewrite(llama_dir, lambda t: t.update({extra: np.zeros((3, 4), np.float32)}))
    with pytest.raises(ValueError, match=re.escape(f"unexpected tensor(s) {extra}")):
        loader.load_model(str(llama_dir))


def test_wrongly_shaped_tensor(llama_dir) -> None:
    def shrink(t):
        t[Q0] = t[Q0][:-1]  # [64, 64] -> [63, 64]

    rewrite(llama_dir, shrink)
    with pytest.raises(ValueError) as e:
        loader.load_model(str(llama_dir))
    msg = str(e.value)
    assert Q0 in msg and "(63, 64)" in msg and "expected (64, 64)" in msg
    assert "(64, 4, 16)" in msg  # our param's shape


def test_missing_config_json(llama_dir) -> None:
    (llama_dir / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json not found"):
        loader.load_model(str(llama_dir))


def test_unsupported_model_type(llama_dir) -> None:
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type.*'gpt2'"):
        loader.load_model(str(llama_dir))


def test_missing_shard_file(tmp_path) -> None:
    path = hf_models.make_hf_model(tmp_path, "qwen2")  # several shards + index
    index = json.loads((path / hf.INDEX_FILE).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (path / victim).unlink()
    with pytest.raises(ValueError, match=re.escape(f"shard file {victim!r}")):
        loader.load_model(str(path))


def test_unknown_model_path(tmp_path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"model={str(tmp_path / 'nope')!r}")):
        loader.load_model(str(tmp_path / "nope"))


def test_mixed_sliding_window_layers_are_rejected(tmp_path) -> None:
    path = hf_models.make_hf_model(tmp_path, "qwen2", use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1)  # layer 0 full, layer 1 sliding
    with pytest.raises(ValueError, match="layer_types=.*not supported"):
        loader.load_model(str(path))


@pytest.mark.parametrize("dtype, name", [("int8", "I8"), ("float8_e4m3fn", "F8_E4M3"),
                                         ("bool", "BOOL")])
def test_non_float_tensor_is_refused(llama_dir, dtype: str, name: str) -> None:
    """Quantized or corrupt weights must not be cast to float and served (int8 -> garbage)."""
    import torch
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    tensors = load_torch(llama_dir / "model.safetensors")
    tensors[Q0] = tensors[Q0].to(getattr(torch, dtype))
    save_torch(tensors, llama_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"tensor {Q0} has dtype {name}")):
        loader.load_model(str(llama_dir))


def test_quantized_checkpoint_names_quantization_config(llama_dir) -> None:
    """An AWQ export (int32 packed qweight/qzeros, fp16 scales instead of every Linear weight):
    the error names config.json's quantization_config, not a 'missing tensor' of a broken copy."""
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 32}
    (llama_dir / "config.json").write_text(json.dumps(cfg))

    def quantize(t):
        for name in [n for n in t if n.endswith("_proj.weight")]:
            out, inp = t.pop(name).shape
            base = name[:-len("weight")]
            t[base + "qweight"] = np.zeros((inp, out // 8), np.int32)
            t[base + "qzeros"] = np.zeros((inp // 32, out // 8), np.int32)
            t[base + "scales"] = np.ones((inp // 32, out), np.float16)

    rewrite(llama_dir, quantize)
    with pytest.raises(ValueError, match="quantization_config.*'awq'.*not supported"):
        loader.load_model(str(llama_dir))


@pytest.mark.parametrize("damage", ["lfs_pointer", "truncated"])
def test_unreadable_safetensors_file_is_named(llama_dir, damage: str) -> None:
    """A git-lfs pointer (cloned without git-lfs) or an interrupted download: a ValueError naming
    the file, not safetensors' bare 'header too large'."""
    f = llama_dir / "model.safetensors"
    if damage == "lfs_pointer":
        f.write_text("version https://git-lfs.github.com/spec/v1\n"
                     "oid sha256:" + "0" * 64 + "\nsize 4976698672\n")
    else:
        data = f.read_bytes()
        f.write_bytes(data[:len(data) - 1000])
    with pytest.raises(ValueError, match=re.escape(str(f))):
        loader.load_model(str(llama_dir))


def test_index_naming_a_tensor_its_shard_lacks(tmp_path) -> None:
    path = hf_models.make_hf_model(tmp_path, "qwen2")  # several shards + index
    index = json.loads((path / hf.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]  # a stale or hand-edited index
    (path / hf.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=re.escape(name) + ".*" + re.escape(shards[1])):
        loader.load_model(str(path))


def test_config_json_that_is_not_an_object_is_named(tmp_path):
    from xlaserve.checkpoints.hf import read_hf_config
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: must hold a JSON object"):
        read_hf_config(tmp_path)


def test_corrupt_tokenizer_json_is_named(tmp_path):
    from xlaserve.checkpoints.tokenizer import Tokenizer
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
