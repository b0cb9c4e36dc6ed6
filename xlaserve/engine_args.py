"""Engine options shared by the CLI commands (generate, serve, profile) and by `xlaserve.LLM`.

`add_engine_args(parser)` adds the flags; `engine_config_from_args(args)` builds the EngineConfig,
turning a bad value into `xlaserve.cli.UsageError` (exit code 2) naming the field.
`engine_config_from_options(model, **options)` is the keyword form used by the offline API.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from xlaserve.runtime.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig

_CACHE = ("page_size", "num_pages", "gpu_memory_utilization", "enable_prefix_caching")
_SCHED = ("max_num_batched_tokens", "max_num_seqs", "max_model_len")
_PARALLEL = ("tensor_parallel_size", "data_parallel_size")
_TOP = ("load_format", "dtype", "attention_impl", "compilation_cache_dir", "seed")
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
    g.add_argument("--attention-impl", help="ragged paged attention implementation (auto)")
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


def config_summary(cfg: EngineConfig) -> dict[str, Any]:
    """A flat dict of the config (for logs and --json output)."""
    return dataclasses.asdict(cfg)
