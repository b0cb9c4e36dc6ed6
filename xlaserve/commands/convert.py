"""`xlaserve convert`: an HF checkpoint (or builtin:NAME) -> xlaserve's orbax directory.

The output is self-contained: params (orbax), our config, and every non-weight file of the source
(config.json, generation_config.json, tokenizer files, chat template) copied along.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil

from xlaserve.cli import UsageError

# Source files that hold weights (not copied: the params are rewritten in orbax form).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_WEIGHT_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory or builtin:NAME")
    parser.add_argument("--output", required=True, help="new directory for the converted model")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="dtype of the stored params")


def copy_side_files(src: pathlib.Path, dst: pathlib.Path) -> list[str]:
    """Copies every non-weight regular file of src into dst; returns the names copied."""
    copied = []
    for path in sorted(src.iterdir()):
        if not path.is_file() or path.name.endswith(_WEIGHT_SUFFIXES) or path.name in _WEIGHT_NAMES:
            continue
        shutil.copy2(path, dst / path.name)
        copied.append(path.name)
    return copied


def run(args: argparse.Namespace) -> int:
    from xlaserve.checkpoints import loader, orbax_io

    output = pathlib.Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {str(output)!r} exists and is not a directory")
    if output.exists() and any(output.iterdir()):
        raise UsageError(f"--output {str(output)!r} exists and is not empty")
    try:
        loaded = loader.load_model(args.model, load_format="safetensors", dtype=args.dtype)
    except ValueError as e:
        raise UsageError(str(e)) from e
    orbax_io.save(output, loaded.config, loaded.params)
    copied = copy_side_files(loaded.model_dir, output)
    print(f"converted {args.model} -> {output} ({loaded.config.model_type}, {args.dtype}; "
          f"copied {', '.join(copied) or 'no side files'})")
    return 0
