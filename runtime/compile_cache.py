"""JAX persistent compilation cache setup, per-compile records, and the recompile guard.

- `setup_compilation_cache` points JAX's on-disk compilation cache at a directory (default
  ``$XLASERVE_CACHE_DIR/jax_cache``, else ``$XDG_CACHE_HOME/xlaserve/jax_cache``, else
  ``~/.cache/xlaserve/jax_cache``) with size and time thresholds at 0, so every program is cached,
  small CPU test programs included. The cache is process-wide JAX state; this is the one place
  that sets it.
- `lower_and_compile` lowers and compiles one jitted function for abstract arguments and keeps a
  `CompileRecord` (timings, whether the persistent cache served it, the lowered and compiled
  objects for cost / memory analysis and HLO text).
- `RecompileGuard` counts XLA compiles that happen in the calling thread inside `watch()`; once
  armed (after warm-up) each one is logged as an ERROR with the shapes and recorded.

Cache hits are observed through JAX's monitoring events (names from jax/_src/compiler.py and
jax/_src/dispatch.py; a test fails if JAX renames them). Listeners are global in JAX, so each
one here only counts events raised by the thread that installed it.

This module does not choose buckets or run anything on the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cc

log = logging.getLogger(__name__)

# JAX monitoring event names.
CACHE_REQUEST_EVENT = "/jax/compilation_cache/compile_requests_use_cache"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def default_cache_dir() -> str:
    """The default persistent cache directory (see the module docstring)."""
    root = os.environ.get("XLASERVE_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "xlaserve")
    return os.path.join(root, "jax_cache")


def setup_compilation_cache(cache_dir: str | None = None) -> str:
    """Enables JAX's persistent compilation cache in `cache_dir` (None: `default_cache_dir()`).

    Re-pointing the cache at another directory resets JAX's cache object so the new directory is
    used from the next compile on.

    Args:
      cache_dir: directory for cached executables; created if missing.
    Returns:
      The absolute directory in use.
    Raises:
      ValueError: `cache_dir` is empty or exists and is not a directory.
    """
    if cache_dir is not None and not str(cache_dir).strip():
        raise ValueError(f"compilation_cache_dir={cache_dir!r}: must be a non-empty path or None")
    path = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"compilation_cache_dir={path!r}: exists and is not a directory")
    os.makedirs(path, exist_ok=True)
    # `values` rather than the attribute: Config declares its options dynamically, so the
    # checker cannot see `jax.config.jax_compilation_cache_dir` (same value).
    previous = jax.config.values["jax_compilation_cache_dir"]
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if previous != path:
        jax_cc.reset_cache()  # JAX opens its cache once; make it reopen at the new path
    log.info("persistent compilation cache at %s", path)
    return path


class _EventCounter:
    """One JAX monitoring listener for the process, registered once, counting per thread.

    Registering a listener per block and removing it after (the first version) is not safe
    when several threads compile or step at once (data-parallel replicas): jax walks its listener
    list while another thread removes from it, and an event can be missed.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._registered = False

    def _on_event(self, event: str, *_args: Any, **_kwargs: Any) -> None:
        for counts in getattr(self._local, "active", ()):
            if event in counts:
                counts[event] += 1

    @contextlib.contextmanager
    def count(self, names: tuple[str, ...]) -> Iterator[dict[str, int]]:
        """Counts the named events raised by this thread inside the block."""
        with self._lock:
            if not self._registered:
                jax.monitoring.register_event_listener(self._on_event)
                jax.monitoring.register_event_duration_secs_listener(self._on_event)
                self._registered = True
        counts = dict.fromkeys(names, 0)
        active = self._local.__dict__.setdefault("active", [])
        active.append(counts)
        try:
            yield counts
        finally:  # by identity: equal counts of nested blocks compare equal
            del active[next(i for i in range(len(active) - 1, -1, -1) if active[i] is counts)]


_EVENTS = _EventCounter()  # jax.monitoring's listeners are process-wide: so is this


def _thread_events(names: tuple[str, ...]) -> contextlib.AbstractContextManager[dict[str, int]]:
    """Counts the named JAX monitoring events raised by this thread inside the block."""
    return _EVENTS.count(names)


@dataclasses.dataclass
class CompileRecord:
    """One lowered + compiled program and what it cost."""

    lower_s: float  # trace + lower to StableHLO
    compile_s: float  # XLA compile, or the persistent cache read when it hit
    cache_hit: bool | None  # persistent cache served it; None when the cache was not used
    lowered: Any  # jax.stages.Lowered: .as_text(), .compiler_ir()
    compiled: Any  # jax.stages.Compiled: .cost_analysis(), .memory_analysis(), .as_text()


def lower_and_compile(jitted: Any, *args: Any) -> CompileRecord:
    """Lowers and compiles `jitted` for `args` (arrays or jax.ShapeDtypeStruct).

    Args:
      jitted: a `jax.jit`-wrapped function.
      *args: its positional arguments, abstract or concrete.
    Returns:
      The CompileRecord; call `record.compiled(*args)` to run it without any further compile.
    """
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    with _thread_events((CACHE_REQUEST_EVENT, CACHE_HIT_EVENT)) as counts:
        compiled = lowered.compile()
    t2 = time.perf_counter()
    cache_hit: bool | None = None
    if counts[CACHE_REQUEST_EVENT]:
        cache_hit = counts[CACHE_HIT_EVENT] > 0
    return CompileRecord(lower_s=t1 - t0, compile_s=t2 - t1, cache_hit=cache_hit,
                         lowered=lowered, compiled=compiled)


@dataclasses.dataclass(frozen=True)
class LateCompile:
    """A compile seen after warm-up: which shapes caused it and how many XLA compiles."""

    shapes: str  # human-readable description of the input shapes
    num_compiles: int
    time: float  # time.time() when seen


class RecompileGuard:
    """Counts compiles raised in the calling thread inside `watch()`; errors once armed.

    Before `arm()` compiles are expected (warm-up) and ignored. After it, every XLA compile inside
    `watch()` increments `compiles_after_warmup`, appends a `LateCompile` to `compile_log` and is
    logged at ERROR level with the shapes.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.armed = False
        self.compiles_after_warmup = 0
        self.compile_log: list[LateCompile] = []

    def arm(self) -> None:
        """Marks the end of warm-up: from now on every compile is an error."""
        self.armed = True

    def report(self, shapes: str, num_compiles: int) -> None:
        """Records `num_compiles` late compiles caused by `shapes` (no-op before arming)."""
        if not self.armed or num_compiles <= 0:
            return
        self.compiles_after_warmup += num_compiles
        self.compile_log.append(LateCompile(shapes=shapes, num_compiles=num_compiles,
                                            time=time.time()))
        log.error("%s: %d compile(s) after warm-up for shapes %s (total %d); every step shape "
                  "should fall in a warmed-up bucket", self.name, num_compiles, shapes,
                  self.compiles_after_warmup)

    @contextlib.contextmanager
    def watch(self, shapes: Callable[[], str]) -> Iterator[None]:
        """Counts the XLA compiles inside the block; `shapes()` describes them when any."""
        with _thread_events((BACKEND_COMPILE_EVENT,)) as counts:
            yield
        if counts[BACKEND_COMPILE_EVENT]:
            self.report(shapes(), counts[BACKEND_COMPILE_EVENT])
