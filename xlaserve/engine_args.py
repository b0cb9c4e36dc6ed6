"""Engine options shared by the CLI commands (generate, serve, profile) and by `xlaserve.LLM`.

`add_engine_args(parser)` adds the flags; `engine_config_from_args(args)` builds the EngineConfig,
turning a bad value into `xlaserve.cli.UsageError` (exit code 2) naming the field.
`engine_config_from_options(model, **options)` is the keyword form used by the offline API.
`check_engine_config(cfg)` checks, before any weights load, what can be checked cheaply (the model
directory and its config.json, the device count and tensor-parallel split, the attention
implementation on this platform, the compilation cache directory), so that a bad flag exits 2
at once instead of failing after a long load (or, for `serve`, after the ports are open).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
from typing import Any

from xlaserve.runtime.config import (
    DECODE_GEMM_MODES,
    CacheConfig,
    EngineConfig,
    ParallelConfig,
    SchedulerConfig,
)

_CACHE = ("page_size", "num_pages", "gpu_memory_utilization", "enable_prefix_caching")
_SCHED = ("max_num_batched_tokens", "max_num_seqs", "max_model_len")
_PARALLEL = ("tensor_parallel_size", "data_parallel_size", "all_reduce")
_TOP = ("load_format", "dtype", "attention_impl", "decode_gemm", "compilation_cache_dir", "seed")
OPTION_NAMES = _CACHE + _SCHED + _PARALLEL + _TOP


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Adds the engine flags. Defaults are None: unset flags keep EngineConfig's defaults."""
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default="builtin:tiny",
                   help="HF or converted model directory, or builtin:NAME (default builtin:tiny)")
    g.add_argument("--load-format", choices=["auto", "safetensors", "orbax", "dummy"],
                   help="how to read the weights (dummy: random weights)")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="weight dtype")
    g.add_argument("--max-num-batched-tokens", type=int, help="token budget per step")
    g.add_argument("--max-num-seqs", type=int, help="most sequences in one step")
    g.add_argument("--max-model-len", type=int, help="longest prompt + output")
    g.add_argument("--page-size", type=int, help="tokens per KV page (8..128)")
    g.add_argument("--num-pages", type=int, help="KV pages (default: from memory)")
    g.add_argument("--gpu-memory-utilization", type=float,
                   help="fraction of device memory for weights + KV (default 0.9)")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    g.add_argument("--tensor-parallel-size", type=int, help="devices on the model axis")
    g.add_argument("--data-parallel-size", type=int, help="devices on the data axis")
    g.add_argument("--all-reduce", choices=["auto", "xla", "custom", "psum"],
                   help="tp > 1: all-reduce of the row-parallel projections (auto: xlaserve's "
                        "kernel for decode-sized steps on GPUs, XLA's collective otherwise)")
    g.add_argument("--attention-impl", help="ragged paged attention implementation (auto)")
    g.add_argument("--decode-gemm", choices=DECODE_GEMM_MODES,
                   help="q/k/v, o and down projections of decode-sized steps (auto: the Pallas "
                        "skinny GEMM for shapes of its measured table on GPUs, XLA's otherwise)")
    g.add_argument("--compilation-cache-dir", help="persistent XLA compilation cache directory")
    g.add_argument("--seed", type=int, help="base seed for requests that give none")


def engine_config_from_options(model: str = "builtin:tiny", **options: Any) -> EngineConfig:
    """Builds an EngineConfig from flat keyword options (None values keep the defaults).

    Raises:
      ValueError: an unknown option, or a bad value (the message names the field).
    """
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown engine option (known: {', '.join(OPTION_NAMES)})")
    opts = {k: v for k, v in options.items() if v is not None}

    def pick(names: tuple[str, ...]) -> dict[str, Any]:
        return {k: opts[k] for k in names if k in opts}

    return EngineConfig(
        model=model, cache=CacheConfig(**pick(_CACHE)), scheduler=SchedulerConfig(**pick(_SCHED)),
        parallel=ParallelConfig(**pick(_PARALLEL)), **pick(_TOP))


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from parsed `add_engine_args` flags; a bad value raises UsageError."""
    from xlaserve.cli import UsageError

    options = {k: getattr(args, k, None) for k in OPTION_NAMES if k != "enable_prefix_caching"}
    if getattr(args, "no_prefix_caching", False):
        options["enable_prefix_caching"] = False
    try:
        return engine_config_from_options(args.model, **options)
    except ValueError as e:
        raise UsageError(str(e)) from e


def check_engine_config(cfg: EngineConfig) -> pathlib.Path:
    """Checks the flags that would otherwise fail only after loading; returns the model directory.

    Reads config.json only (no weights). Raises UsageError naming the flag and the value.
    """
    import jax

    from xlaserve.checkpoints.loader import load_model_config, resolve_model_dir
    from xlaserve.cli import UsageError
    from xlaserve.pallas_kernels import ops
    from xlaserve.sharding import mesh

    try:
        model_dir = resolve_model_dir(cfg.model)
        model_cfg = load_model_config(model_dir, dtype=cfg.dtype)
    except (ValueError, OSError) as e:
        msg = str(e)
        raise UsageError(msg if msg.startswith("model=") else f"--model={cfg.model!r}: {msg}"
                         ) from e
    if cfg.parallel.world_size > 1:
        try:
            mesh.validate_devices(cfg.parallel, len(jax.devices()))
            mesh.validate_model(cfg.parallel, model_cfg)
        except ValueError as e:
            raise UsageError(str(e)) from e
    impl = cfg.attention_impl
    if impl not in ops.IMPLEMENTATIONS:
        raise UsageError(f"--attention-impl={impl!r}: must be one of "
                         f"{', '.join(ops.IMPLEMENTATIONS)}")
    reason = "available" if impl == "auto" else ops.available_implementations()[impl]
    if not reason.startswith("available"):
        raise UsageError(f"--attention-impl={impl!r}: not available here: {reason}")
    if cfg.decode_gemm == "pallas" and jax.default_backend() != "gpu":
        raise UsageError(f"--decode-gemm='pallas': needs an NVIDIA GPU (platform is "
                         f"{jax.default_backend()!r}); 'auto' uses XLA's GEMMs here")
    if cfg.compilation_cache_dir is not None:
        if not cfg.compilation_cache_dir.strip():
            raise UsageError("--compilation-cache-dir='': must be a directory path")
        path = pathlib.Path(cfg.compilation_cache_dir).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--compilation-cache-dir={cfg.compilation_cache_dir!r}: cannot "
                             f"create it ({e.strerror or e})") from e
        if not os.access(path, os.W_OK):
            raise UsageError(f"--compilation-cache-dir={cfg.compilation_cache_dir!r}: "
                             "not writable")
    return model_dir


def config_summary(cfg: EngineConfig) -> dict[str, Any]:
    """A flat dict of the config (for logs and --json output)."""
    return dataclasses.asdict(cfg)
