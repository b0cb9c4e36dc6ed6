"""Parity with Hugging Face transformers for every supported family (float32, CPU).

Prefill logits of all tokens, token-by-token paged decode, and 32 greedy tokens must match the
transformers implementation of the same tiny random-init checkpoint.
"""

from __future__ import annotations

import hf_models
import jax
import numpy as np
import pytest
from paged_helpers import (
    PagedSeq,
    build_step,
    greedy_generate,
    jit_forward,
    jit_forward_hidden,
    permuted_pages,
)

from xlaserve.checkpoints import hf
from xlaserve.runtime.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.hf

PROMPT = [5, 17, 99, 8, 250, 3, 42]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """family -> (config, params, HF torch model), built once per module."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in hf_models.FAMILIES:
        path = hf_models.make_hf_model(root, family)
        cfg = hf.load_config(path, dtype="float32")
        out[family] = (cfg, hf.load_hf_params(path, cfg), hf_models.load_hf_model(path))
    return out


def hf_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens], dtype=torch.long)).logits[0].float().numpy()


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    tol = 1e-4 * float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert err < tol, f"{what}: max abs diff {err:.3g} >= tol {tol:.3g}"


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_prefill_logits_match_hf(models: dict, family: str) -> None:
    cfg, params, model = models[family]
    tokens = list(np.random.RandomState(1).randint(0, cfg.vocab_size, size=21))
    page_size, max_pages = 8, 3
    seq = PagedSeq(permuted_pages(np.random.RandomState(2), 8, [max_pages])[0])
    inputs = build_step([seq], [tokens], page_size=page_size, t_pad=24, s_pad=2,
                        max_pages=max_pages)
    cache = llama.init_kv_cache(cfg, 8, page_size)
    hidden, _ = jit_forward_hidden(params, inputs, cache, cfg)
    ours = np.asarray(llama.compute_logits(params, hidden[:len(tokens)], cfg))
    assert ours.dtype == np.float32
    assert_close(ours, hf_logits(model, tokens), f"{family} prefill")


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_paged_decode_matches_hf(models: dict, family: str) -> None:
    cfg, params, model = models[family]
    tokens = list(np.random.RandomState(3).randint(0, cfg.vocab_size, size=19))
    ref = hf_logits(model, tokens)
    page_size, max_pages, prefill = 4, 5, 3
    seq = PagedSeq(permuted_pages(np.random.RandomState(4), 12, [max_pages])[0])
    cache = llama.init_kv_cache(cfg, 12, page_size)
    inputs = build_step([seq], [tokens[:prefill]], page_size=page_size, t_pad=16, s_pad=1,
                        max_pages=max_pages)
    logits, cache = jit_forward(params, inputs, cache, cfg)
    assert_close(np.asarray(logits[0]), ref[prefill - 1], f"{family} prefill")
    for i in range(prefill, len(tokens)):
        inputs = build_step([seq], [[tokens[i]]], page_size=page_size, t_pad=16, s_pad=1,
                            max_pages=max_pages)
        logits, cache = jit_forward(params, inputs, cache, cfg)
        assert_close(np.asarray(logits[0]), ref[i], f"{family} decode position {i}")


def test_mistral_sliding_window_is_exercised(models: dict) -> None:
    """Without the window the logits past the window differ: the parity above really tests it."""
    cfg, params, model = models["mistral"]
    assert cfg.sliding_window == 8
    tokens = list(np.random.RandomState(1).randint(0, cfg.vocab_size, size=21))
    seq = PagedSeq([1, 2, 3])
    inputs = build_step([seq], [tokens], page_size=8, t_pad=24, s_pad=1, max_pages=3)
    no_window = cfg.replace(sliding_window=None)
    hidden, _ = llama.forward_hidden(params, inputs, llama.init_kv_cache(no_window, 4, 8),
                                     no_window)
    ours = np.asarray(llama.compute_logits(params, hidden[:len(tokens)], no_window))
    ref = hf_logits(model, tokens)
    assert np.abs(ours[-1] - ref[-1]).max() > 1e-2 * np.abs(ref).max()
    assert_close(ours[:8], ref[:8], "inside the window")


@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_greedy_tokens_match_hf_generate(models: dict, family: str) -> None:
    cfg, params, model = models[family]
    ours = greedy_generate(params, cfg, PROMPT, 32, page_size=8)
    gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=32, eos_token_id=None,
                                        pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), generation_config=gen)
    theirs = out[0, len(PROMPT):].tolist()
    assert len(theirs) == 32
    assert ours == theirs


def test_params_are_a_plain_dict_of_arrays(models: dict) -> None:
    cfg, params, _ = models["qwen3"]
    assert isinstance(params, dict)
    for leaf in jax.tree.leaves(params):
        assert isinstance(leaf, jax.Array) and leaf.dtype == np.float32
    assert jax.tree.structure(params) == jax.tree.structure(llama.abstract_params(cfg))


def test_qwen2_with_sliding_window_on_every_layer(tmp_path) -> None:
    path = hf_models.make_hf_model(tmp_path, "qwen2", use_sliding_window=True, sliding_window=6,
                                   max_window_layers=0)
    cfg = hf.load_config(path, dtype="float32")
    assert cfg.sliding_window == 6
    params = hf.load_hf_params(path, cfg)
    tokens = list(np.random.RandomState(5).randint(0, cfg.vocab_size, size=15))
    seq = PagedSeq([3, 1])
    inputs = build_step([seq], [tokens], page_size=8, t_pad=16, s_pad=1, max_pages=2)
    hidden, _ = jit_forward_hidden(params, inputs, llama.init_kv_cache(cfg, 4, 8), cfg)
    ours = np.asarray(llama.compute_logits(params, hidden[:len(tokens)], cfg))
    assert_close(ours, hf_logits(hf_models.load_hf_model(path), tokens), "qwen2 sliding")
