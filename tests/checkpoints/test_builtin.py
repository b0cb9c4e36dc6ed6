"""Built-in tiny models: deterministic, atomic, self-consistent, loadable by transformers."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from xlaserve.checkpoints import builtin
from xlaserve.checkpoints.builtin import BUILTIN_MODELS, builtin_model_dir
from xlaserve.checkpoints.tokenizer import Tokenizer
from xlaserve.runtime.config import ModelConfig


def _digest(path: pathlib.Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_deterministic_across_cache_dirs(name: str, cache: pathlib.Path,
                                         tmp_path: pathlib.Path) -> None:
    a = builtin_model_dir(name, cache_dir=cache)
    b = builtin_model_dir(name, cache_dir=tmp_path)
    assert a != b and a.name == b.name == f"{name}-v{builtin.BUILTIN_VERSION}"
    assert a.parent == cache / "builtin"
    da = _digest(a)
    assert set(builtin.REQUIRED_FILES) | {builtin.MARKER_FILE} <= set(da)
    assert da == _digest(b)
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_training_is_deterministic_across_processes(tmp_path: pathlib.Path) -> None:
    """Hash seeds and thread counts must not change the trained tokenizers."""
    code = ("import hashlib, sys; from xlaserve.checkpoints import builtin as b; "
            "print(hashlib.sha256((b.build_sentencepiece_bpe(b.CORPUS, 700).to_str() + "
            "b.build_byte_level_bpe(b.CORPUS, 700).to_str()).encode()).hexdigest())")
    digests = set()
    for seed, threads in (("1", "1"), ("2", "2"), ("random", "4")):
        env = dict(os.environ, PYTHONHASHSEED=seed, RAYON_NUM_THREADS=threads,
                   TOKENIZERS_PARALLELISM="true")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_second_call_reuses_the_directory(cache: pathlib.Path) -> None:
    d = builtin_model_dir("tiny", cache_dir=cache)
    before = {f.name: f.stat().st_mtime_ns for f in d.iterdir()}
    assert builtin_model_dir("tiny", cache_dir=cache) == d
    assert {f.name: f.stat().st_mtime_ns for f in d.iterdir()} == before


def test_incomplete_directory_is_rebuilt(tmp_path: pathlib.Path) -> None:
    good = _digest(builtin_model_dir("tiny", cache_dir=tmp_path / "ref"))
    broken = tmp_path / "c" / "builtin" / f"tiny-v{builtin.BUILTIN_VERSION}"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    assert _digest(builtin_model_dir("tiny", cache_dir=tmp_path / "c")) == good
    # Complete but made by another generator version (its marker differs): rebuilt as well.
    (broken / "tokenizer.json").write_text("{}")
    marker = json.loads((broken / builtin.MARKER_FILE).read_text())
    (broken / builtin.MARKER_FILE).write_text(json.dumps(marker | {"generator_sha256": "old"}))
    assert _digest(builtin_model_dir("tiny", cache_dir=tmp_path / "c")) == good
    assert sorted(p.name for p in broken.parent.iterdir()) == ["tiny-v1"]


def test_cache_location_from_environment(tmp_path: pathlib.Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XLASERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin.default_cache_dir() == tmp_path / "xdg" / "xlaserve"
    monkeypatch.setenv("XLASERVE_CACHE_DIR", str(tmp_path / "own"))
    assert builtin_model_dir() == tmp_path / "own" / "builtin" / "tiny-v1"
    monkeypatch.delenv("XLASERVE_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert builtin.default_cache_dir() == pathlib.Path.home() / ".cache" / "xlaserve"


def test_unknown_name_lists_known() -> None:
    with pytest.raises(ValueError, match="name='nope'.*tiny, tiny-qwen3"):
        builtin_model_dir("nope")


def test_concurrent_processes(tmp_path: pathlib.Path) -> None:
    code = ("import sys; from xlaserve.checkpoints.builtin import builtin_model_dir; "
            "print(builtin_model_dir('tiny', cache_dir=sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1
    ref = _digest(builtin_model_dir("tiny", cache_dir=tmp_path / "ref"))
    assert _digest(pathlib.Path(outs[0][0].strip())) == ref
    assert sorted(p.name for p in (tmp_path / "builtin").iterdir()) == ["tiny-v1"]


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_files_agree_with_each_other(name: str, cache: pathlib.Path) -> None:
    d = builtin_model_dir(name, cache_dir=cache)
    spec = BUILTIN_MODELS[name]
    config = json.loads((d / "config.json").read_text())
    tok = Tokenizer.from_dir(d)
    assert 500 <= tok.vocab_size <= 1000
    assert config["vocab_size"] == tok.vocab_size
    assert config["model_type"] == spec.model_type
    assert config["head_dim"] * config["num_attention_heads"] == 64
    cfg = ModelConfig.from_hf_config(config, dtype="float32")
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert cfg.qk_norm == (spec.model_type == "qwen3")
    assert set(cfg.eos_token_ids) <= set(tok.eos_token_ids) and tok.eos_token_ids
    weights = load_file(str(d / "model.safetensors"))
    d_model, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    expected = {"model.embed_tokens.weight": (cfg.vocab_size, d_model),
                "lm_head.weight": (cfg.vocab_size, d_model), "model.norm.weight": (d_model,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        expected |= {p + "self_attn.q_proj.weight": (cfg.num_heads * h, d_model),
                     p + "self_attn.k_proj.weight": (cfg.num_kv_heads * h, d_model),
                     p + "self_attn.v_proj.weight": (cfg.num_kv_heads * h, d_model),
                     p + "self_attn.o_proj.weight": (d_model, cfg.num_heads * h),
                     p + "mlp.gate_proj.weight": (f, d_model),
                     p + "mlp.up_proj.weight": (f, d_model),
                     p + "mlp.down_proj.weight": (d_model, f),
                     p + "input_layernorm.weight": (d_model,),
                     p + "post_attention_layernorm.weight": (d_model,)}
        if cfg.qk_norm:
            expected |= {p + "self_attn.q_norm.weight": (h,), p + "self_attn.k_norm.weight": (h,)}
    assert {k: v.shape for k, v in weights.items()} == expected
    for k, v in weights.items():
        assert v.dtype == np.float32
        if k.endswith("norm.weight"):
            assert np.all(v == 1.0), k
        else:
            assert 0.015 < float(v.std()) < 0.12, k
    assert not np.allclose(weights["model.layers.0.mlp.up_proj.weight"],
                           weights["model.layers.1.mlp.up_proj.weight"])
    msgs = [{"role": "user", "content": "Hi"}]
    ids = tok.encode(tok.apply_chat_template(msgs))
    assert ids.count(tok.bos_token_id) <= 1 if tok.bos_token_id is not None else True


@pytest.mark.hf
@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_transformers_loads_and_generates(name: str, cache: pathlib.Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    d = builtin_model_dir(name, cache_dir=cache)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(d), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(d))
    ours = Tokenizer.from_dir(d)
    # Every tensor transformers holds is the one we wrote (nothing re-initialized).
    weights = load_file(str(d / "model.safetensors"))
    state = model.state_dict()
    for k, v in weights.items():
        np.testing.assert_array_equal(state[k].numpy(), v)
    text = "The capital of France is"
    assert hf_tok.encode(text) == ours.encode(text)
    msgs = [{"role": "user", "content": "Tell me a story."}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(msgs)
    ids = torch.tensor([ours.encode(text)])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert float(logits.std()) > 0.1  # random weights, but not degenerate
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) >= 1 and len(set(new)) > 1 or new[0] in ours.eos_token_ids
    assert all(0 <= t < ours.vocab_size for t in new)
