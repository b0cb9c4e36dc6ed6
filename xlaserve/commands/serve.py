"""`xlaserve serve`: load a model, compile every bucket, then serve it over gRPC until SIGTERM.

Health is NOT_SERVING while loading and warming up, SERVING after, NOT_SERVING while draining.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from xlaserve.cli import UsageError
from xlaserve.engine_args import add_engine_args, check_engine_config, engine_config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0: any)")
    g.add_argument("--metrics-port", type=int, default=9090,
                   help="Prometheus /metrics port (default 9090; 0: any; -1: off)")
    g.add_argument("--served-model-name",
                   help="the model name clients use (default: the model path's last part)")
    g.add_argument("--max-queue", type=int, default=256,
                   help="requests held at once, running + waiting; past it RESOURCE_EXHAUSTED")
    g.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024,
                   help="larger requests get INVALID_ARGUMENT (default 4 MiB)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests (default 30)")
    add_engine_args(parser)


def default_model_name(model: str) -> str:
    """`builtin:tiny` -> `tiny`; `/models/Llama-3.2-1B/` -> `Llama-3.2-1B`."""
    name = model.rstrip("/").rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if name.startswith("builtin:") else name


def run(args: argparse.Namespace) -> int:
    from xlaserve.serve.grpc_server import GrpcServer, ServerOptions, serve_until_signal

    config = engine_config_from_args(args)
    try:
        options = ServerOptions(
            model_name=args.served_model_name or default_model_name(config.model),
            host=args.host, port=args.port,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            max_in_flight=args.max_queue, max_request_bytes=args.max_request_bytes,
            drain_timeout_s=args.drain_timeout)
    except ValueError as e:
        raise UsageError(str(e)) from e
    check_engine_config(config)  # a bad --model etc. exits 2 here, before the ports open
    if config.parallel.data_parallel_size > 1:
        print(f"xlaserve serve: warning: data_parallel_size={config.parallel.data_parallel_size}"
              f" runs the replicas in this one process, sharing the GIL with the gRPC streams;"
              f" measured 0.81x one GPU's output tokens/s at 256 concurrent streams (BENCHMARKS.md"
              f" 0e). One server per GPU behind a load balancer serves more.", file=sys.stderr,
              flush=True)

    def build_engine() -> Any:
        from xlaserve.runtime.engine import Engine

        return Engine.from_config(config)  # loads, then compiles every bucket (warm-up)

    def started(server: GrpcServer) -> None:
        # One machine-readable line so scripts can find the ports (port 0 picks a free one).
        print(f"xlaserve serve: listening on {options.host}:{server.port} "
              f"metrics_port={server.metrics_port} model={options.model_name}", flush=True)

    code = asyncio.run(serve_until_signal(build_engine, options, on_started=started))
    print(f"xlaserve serve: stopped (exit {code})", file=sys.stderr, flush=True)
    return code
