"""Fixtures of the CLI tests: one warmed-up builtin:tiny runner shared by the engines they build."""

from __future__ import annotations

import pytest

from xlaserve.runtime.engine import Engine


@pytest.fixture(scope="module")
def tiny_engine_parts():
    from xlaserve.engine_args import engine_config_from_options

    e = Engine.from_config(engine_config_from_options(
        "builtin:tiny", dtype="float32", max_num_batched_tokens=64, max_num_seqs=16,
        max_model_len=128, page_size=8, num_pages=96))
    return e.runner, e.tokenizer, e.model_config


@pytest.fixture
def fast_engine(monkeypatch, tiny_engine_parts):
    """Engine.from_config reuses one warmed-up runner (a fresh scheduler per run); the list holds
    the configs it was given."""
    runner, tok, mcfg = tiny_engine_parts
    built = []

    def from_config(cfg):
        built.append(cfg)
        return Engine(cfg, runner, tokenizer=tok, model_config=mcfg)
    monkeypatch.setattr(Engine, "from_config", staticmethod(from_config))
    return built
