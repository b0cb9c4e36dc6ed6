"""XLA flags xlaserve sets by default, each with the measurement that justifies it.

XLA reads XLA_FLAGS once, when jax first initializes a backend, so `apply_defaults()` runs at
`import xlaserve` (before any backend exists in a normal program). A flag the user already put in
XLA_FLAGS is left as they set it; XLASERVE_NO_DEFAULT_XLA_FLAGS=1 turns the defaults off. What was
added is logged once by `log_applied()` (the engine and the profile CLI call it), and a warning is
logged when a jax backend was initialized before the defaults could apply. Nothing here imports
jax.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

# name -> (value, why). Measured on one H100 with jax 0.11.2 (bench/results/diag_h100/).
DEFAULTS: dict[str, tuple[str, str]] = {
    "xla_gpu_dot_merger_threshold_mb": (
        "512",
        "XLA merges dots that share an input only below this size (default 32 MB), so the "
        "8B model's gate and up projections (117 MB each) stayed two GEMMs; merged, the batch-1 "
        "decode step went from 6.47 to 6.25 ms (bench/results/diag_h100/dot_merger_*.json)"),
}

_applied: list[str] = []
_late = False


def apply_defaults() -> list[str]:
    """Adds the default flags the user did not set to XLA_FLAGS; returns what was added."""
    global _late
    if os.environ.get("XLASERVE_NO_DEFAULT_XLA_FLAGS", "") not in ("", "0"):
        return []
    current = os.environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, (value, _) in DEFAULTS.items()
             if f"--{name}" not in current]
    if not added:
        return []
    if "jax" in sys.modules:  # a backend made before this point has read XLA_FLAGS already
        try:
            from jax._src import xla_bridge

            _late = bool(xla_bridge.backends_are_initialized())
        except Exception:  # noqa: BLE001 - private API; assume not initialized
            _late = False
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    _applied.extend(added)
    return added


def log_applied() -> None:
    """Logs (once) which default flags were added, or that they came too late to apply."""
    global _applied
    if not _applied:
        return
    if _late:
        log.warning("XLA flags %s were added after a jax backend was initialized: they do not "
                    "apply in this process (import xlaserve before using jax)", " ".join(_applied))
    else:
        for flag in _applied:
            name = flag[2:].split("=", 1)[0]
            log.info("XLA flag %s set by xlaserve: %s", flag, DEFAULTS[name][1])
    _applied = []
