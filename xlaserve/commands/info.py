"""`xlaserve info`: jax version, devices, and which attention implementations are available."""

from __future__ import annotations

import argparse
import json
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import jax
    import jaxlib.version  # jaxlib re-exports its __version__ without declaring it

    import xlaserve
    from xlaserve.pallas_kernels.ops import available_implementations

    devices = jax.devices()
    backend = jax.default_backend()
    info = {
        "xlaserve": xlaserve.__version__,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.version.__version__,
        "backend": backend,
        "devices": [f"{d.platform}:{d.id} {d.device_kind}" for d in devices],
        "attention_implementations": available_implementations(backend),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:24s} {v}")
        elif isinstance(value, list):
            print(f"{key}:")
            for v in value:
                print(f"  {v}")
        else:
            print(f"{key:26s} {value}")
    return 0
