"""Tests of the persistent compilation cache setup, compile records and the recompile guard."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cc

from xlaserve.runtime import compile_cache as cc

_KEYS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
         "jax_persistent_cache_min_compile_time_secs",
         "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture
def restore_jax_cache_config():
    """Puts JAX's process-wide cache settings back so other tests are unaffected."""
    saved = {k: getattr(jax.config, k) for k in _KEYS}
    yield
    for k, v in saved.items():
        jax.config.update(k, v)
    jax_cc.reset_cache()


def test_default_dir_respects_env(monkeypatch):
    monkeypatch.delenv("XLASERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/tmp/xdg-test")
    assert cc.default_cache_dir() == "/tmp/xdg-test/xlaserve/jax_cache"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cc.default_cache_dir() == os.path.expanduser("~/.cache/xlaserve/jax_cache")
    monkeypatch.setenv("XLASERVE_CACHE_DIR", "/tmp/xls")
    assert cc.default_cache_dir() == "/tmp/xls/jax_cache"


def test_setup_rejects_bad_dirs(tmp_path, restore_jax_cache_config):
    with pytest.raises(ValueError, match="compilation_cache_dir"):
        cc.setup_compilation_cache("  ")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="compilation_cache_dir"):
        cc.setup_compilation_cache(str(f))


def test_setup_uses_default_when_none(tmp_path, monkeypatch, restore_jax_cache_config):
    monkeypatch.setenv("XLASERVE_CACHE_DIR", str(tmp_path / "root"))
    path = cc.setup_compilation_cache(None)
    assert path == str(tmp_path / "root" / "jax_cache")
    assert os.path.isdir(path)
    assert jax.config.jax_compilation_cache_dir == path


def _fn(x):
    return jnp.tanh(x) * 3.0 + jnp.sum(x)


def _fresh_fn():
    """A new function object each call, so JAX's in-memory caches cannot serve it."""
    def fn(x):
        return _fn(x)
    return fn


def test_records_miss_then_hit(tmp_path, restore_jax_cache_config):
    cc.setup_compilation_cache(str(tmp_path / "cache"))
    arg = jax.ShapeDtypeStruct((7, 5), jnp.float32)
    first = cc.lower_and_compile(jax.jit(_fresh_fn()), arg)
    assert first.cache_hit is False
    assert os.listdir(tmp_path / "cache"), "nothing was written to the persistent cache"
    # A fresh function has no in-memory cache: the executable comes from disk.
    second = cc.lower_and_compile(jax.jit(_fresh_fn()), arg)
    assert second.cache_hit is True
    x = np.ones((7, 5), np.float32)
    np.testing.assert_allclose(np.asarray(second.compiled(x)), np.asarray(_fn(x)), rtol=1e-6)
    assert "tanh" in second.compiled.as_text()
    assert second.lower_s >= 0 and second.compile_s >= 0


def test_record_without_cache_is_none(restore_jax_cache_config):
    jax.config.update("jax_enable_compilation_cache", False)
    jax_cc.reset_cache()
    rec = cc.lower_and_compile(jax.jit(_fn), jax.ShapeDtypeStruct((3, 2), jnp.float32))
    assert rec.cache_hit is None


def test_guard_ignores_warmup_and_counts_after(caplog):
    guard = cc.RecompileGuard("test")
    f = jax.jit(lambda x: x * 2 + 1)
    with guard.watch(lambda: "warm-up"):
        f(np.ones(3, np.float32))
    assert guard.compiles_after_warmup == 0
    guard.arm()
    with guard.watch(lambda: "same shape"):
        f(np.ones(3, np.float32))  # in-memory jit cache hit: no compile
    assert guard.compiles_after_warmup == 0
    with caplog.at_level(logging.ERROR, logger=cc.__name__):
        with guard.watch(lambda: "x f32[11]"):
            f(np.ones(11, np.float32))
    assert guard.compiles_after_warmup == 1
    assert guard.compile_log[0].shapes == "x f32[11]"
    assert any("after warm-up" in r.message and "f32[11]" in r.message for r in caplog.records)


def test_guard_ignores_other_threads():
    import threading
    guard = cc.RecompileGuard("test")
    guard.arm()
    f = jax.jit(lambda x: x - 5)
    with guard.watch(lambda: "main"):
        t = threading.Thread(target=lambda: f(np.ones(13, np.float32)))
        t.start()
        t.join()
    assert guard.compiles_after_warmup == 0


def test_compile_events_are_counted_per_thread_with_threads_compiling_at_once() -> None:
    """Data-parallel replicas compile and step in threads: each thread's watch counts its own
    compiles only, and none is lost while other threads open and close their watches."""
    import threading

    import jax
    import jax.numpy as jnp

    from xlaserve.runtime import compile_cache as cc

    def compile_one(tag: int) -> None:
        jax.jit(lambda x, c=tag: x * c + 1).lower(
            jax.ShapeDtypeStruct((7 + tag,), jnp.float32)).compile()

    with cc._thread_events((cc.BACKEND_COMPILE_EVENT,)) as one:
        compile_one(1000)
    per_compile = one[cc.BACKEND_COMPILE_EVENT]
    assert per_compile >= 1
    got: dict[int, int] = {}

    def work(k: int) -> None:
        with cc._thread_events((cc.BACKEND_COMPILE_EVENT,)) as counts:
            for i in range(k + 1):
                for _ in range(3):  # short watches of their own, opened and closed meanwhile
                    with cc._thread_events((cc.BACKEND_COMPILE_EVENT,)):
                        pass
                compile_one(100 * k + i)
        got[k] = counts[cc.BACKEND_COMPILE_EVENT]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {k: (k + 1) * per_compile for k in range(3)}
