"""XLA flags (and NCCL settings) xlaserve sets by default, each with the measurement behind it.

XLA reads XLA_FLAGS once, when jax first initializes a backend, so `apply_defaults()` runs at
`import xlaserve` (before any backend exists in a normal program). A flag or variable the user
already set is left as they set it; XLASERVE_NO_DEFAULT_XLA_FLAGS=1 turns all defaults off. What
was added is logged once by `log_applied()` (the engine and the profile CLI call it), and a warning
is logged when a jax backend was initialized before the defaults could apply. Nothing here imports
jax (the jaxlib version comes from the package metadata).

XLA aborts the process on a flag it does not know, so flags that only some XLA versions have carry
the range of jaxlib versions they were measured with, [first, end), and are added only inside it
(the skip is logged, naming the flag and the versions).

What one process did is kept in one `_State` (for the log and for `report()`); `reset_state()`
starts it afresh (tests).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from importlib import metadata

log = logging.getLogger(__name__)

# name -> (value, why). Measured on one H100 with jax 0.11.2 (bench/results/diag_h100/).
DEFAULTS: dict[str, tuple[str, str]] = {
    "xla_gpu_dot_merger_threshold_mb": (
        "512",
        "XLA merges dots that share an input only below this size (default 32 MB), so the "
        "8B model's gate and up projections (117 MB each) stayed two GEMMs; merged, the batch-1 "
        "decode step went from 6.47 to 6.25 ms (bench/results/diag_h100/dot_merger_*.json)"),
}

# Programs with all-reduces (tensor parallelism); no effect on one device. On 2 x H200 with jax
# 0.11.2, runs with XLA's own all-reduce kernel (its default for small all-reduces) hung in 5
# multi-GPU processes of sessions 4-5 (4 had run another tp size before, 1 had not;
# bench/results/session4_h200x*/, session5_h200x2/); the 8 processes with NCCL's all-reduce did
# not. The price: 8B batch-1 decode at tp=2 4.11-4.15 ms vs 4.05 (XLA's kernel, same run), at
# tp=4 4.41 vs 4.12 ms (NCCL's 4-rank all-reduces take 2.4 ms of device time per step, but the step
# is host-bound either way; session5_h200x4/); prefill of 2048 tokens the same at both. NCCL
# inside the CUDA graphs (+COLLECTIVES) was slower and noisy (3.8-5.6 ms), and NCCL_PROTO=LL
# slowed prefill (38.4 ms): neither is a default.
_TP_WHY = ("tensor parallelism: NCCL for all-reduces instead of XLA's all-reduce kernel, which "
           "hung in 5 multi-GPU runs on H200s (NCCL: none of 8); 8B batch-1 decode 2% slower at "
           "tp=2, 7% at tp=4, prefill the same (bench/results/session5_h200x2/, _h200x4/)")
# An "experimental" flag can disappear in a later XLA, which would then abort every xlaserve
# process: such flags are added only for the jaxlib versions they were measured on (the upper
# bound is exclusive); widen the range after measuring a new version.
Versions = tuple[tuple[int, ...], tuple[int, ...]]  # [first, end)
VERSIONED_DEFAULTS: dict[str, tuple[str, Versions, str]] = {
    # name -> (value, jaxlib versions it is added for, why)
    "xla_gpu_experimental_use_collective_kernels": ("-ALL_REDUCE", ((0, 11, 2), (0, 12)),
                                                    _TP_WHY),
}
# Environment variables set the same way (e.g. NCCL_*, read when a communicator is made). None
# now (NCCL_PROTO=LL: see above).
ENV_DEFAULTS: dict[str, tuple[str, Versions, str]] = {}

@dataclasses.dataclass
class _State:
    to_log: list[str] = dataclasses.field(default_factory=list)  # added, not yet logged
    skipped_to_log: list[str] = dataclasses.field(default_factory=list)
    set_by_xlaserve: list[str] = dataclasses.field(default_factory=list)  # for report()
    not_set: list[str] = dataclasses.field(default_factory=list)
    late: bool = False  # flags were added after a jax backend existed
    disabled: bool = False  # XLASERVE_NO_DEFAULT_XLA_FLAGS was set


_state = _State()


def reset_state() -> None:
    """Forgets what earlier apply_defaults() calls did (for tests)."""
    global _state
    _state = _State()


def jaxlib_version() -> tuple[int, ...]:
    """The installed jaxlib version as integers ((0,) when it cannot be read)."""
    try:
        text = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return (0,)
    parts = []
    for piece in text.split(".")[:3]:  # "0.11.2", "0.11.1rc2", "0.12.0.dev20260101"
        digits = re.match(r"\d+", piece)
        parts.append(int(digits.group()) if digits else 0)
        if not digits or digits.end() < len(piece):  # a pre-release: stop at its number
            break
    return tuple(parts)


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def wanted_defaults(version: tuple[int, ...] | None = None,
                    ) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(flags name -> value, env name -> value, skipped notes) for this jaxlib version."""
    version = jaxlib_version() if version is None else version
    flags = {name: value for name, (value, _) in DEFAULTS.items()}
    env: dict[str, str] = {}
    skipped = []
    for table, out, fmt in ((VERSIONED_DEFAULTS, flags, "--{}={}"), (ENV_DEFAULTS, env, "{}={}")):
        for name, (value, (first, end), _) in table.items():
            if first <= version < end:
                out[name] = value
            else:
                skipped.append(f"{fmt.format(name, value)} (measured with jaxlib "
                               f">= {_dotted(first)}, < {_dotted(end)}; installed "
                               f"{_dotted(version)})")
    return flags, env, skipped


def apply_defaults() -> list[str]:
    """Adds the defaults the user did not set to XLA_FLAGS / the environment; returns them."""
    if os.environ.get("XLASERVE_NO_DEFAULT_XLA_FLAGS", "") not in ("", "0"):
        _state.disabled = True
        return []
    _state.disabled = False
    flags, env, skipped = wanted_defaults()
    _state.skipped_to_log = list(skipped)  # this call's view replaces an earlier one
    _state.not_set = list(skipped)
    current = os.environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in flags.items() if f"--{name}" not in current]
    added_env = [f"{name}={value}" for name, value in env.items() if name not in os.environ]
    if not added and not added_env:
        return []
    if added and "jax" in sys.modules:  # a backend made before now has read XLA_FLAGS already
        try:
            from jax._src import xla_bridge

            _state.late = bool(xla_bridge.backends_are_initialized())
        except Exception:  # noqa: BLE001 - private API; assume not initialized
            _state.late = False
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    for item in added_env:
        name, value = item.split("=", 1)
        os.environ[name] = value
    _state.to_log.extend(added + added_env)
    _state.set_by_xlaserve.extend(a for a in added + added_env
                                  if a not in _state.set_by_xlaserve)
    return added + added_env


def report() -> dict[str, object]:
    """For the profile CLI: XLA_FLAGS as jax saw it, and which defaults were (not) set."""
    return {"XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "set_by_xlaserve": list(_state.set_by_xlaserve), "not_set": list(_state.not_set),
            "late": _state.late, "disabled": _state.disabled}


def _why(name: str) -> str:
    for table in (VERSIONED_DEFAULTS, ENV_DEFAULTS):
        if name in table:
            return table[name][2]
    return DEFAULTS[name][1]


def log_applied() -> None:
    """Logs (once) which defaults were added, skipped, or came too late to apply."""
    for note in _state.skipped_to_log:
        log.info("xlaserve default not set: %s", note)
    _state.skipped_to_log = []
    flags = [a for a in _state.to_log if a.startswith("--")]
    env = [a for a in _state.to_log if not a.startswith("--")]  # read by NCCL later: never late
    _state.to_log = []
    if flags and _state.late:
        log.warning("XLA flags %s were added after a jax backend was initialized: they do not "
                    "apply in this process (import xlaserve before using jax)", " ".join(flags))
        flags = []
    for item in flags + env:
        name = item.lstrip("-").split("=", 1)[0]
        log.info("%s set by xlaserve: %s", item, _why(name))
