"""xlaserve.serve: the gRPC server (native xlaserve.v1, KServe v2, health, reflection, metrics).

Public names, imported lazily so that `import xlaserve.serve` stays cheap:
  XlaserveClient   blocking Python client for xlaserve.v1 (serve/client.py)
  GrpcServer, ServerOptions, BackgroundServer, serve_until_signal (serve/grpc_server.py)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xlaserve.serve.client import Completion, XlaserveClient
    from xlaserve.serve.grpc_server import (
        BackgroundServer,
        GrpcServer,
        ServerOptions,
        serve_until_signal,
    )

_EXPORTS = {
    "XlaserveClient": "client", "Completion": "client",
    "GrpcServer": "grpc_server", "ServerOptions": "grpc_server",
    "BackgroundServer": "grpc_server", "serve_until_signal": "grpc_server",
}
__all__ = ["BackgroundServer", "Completion", "GrpcServer", "ServerOptions", "XlaserveClient",
           "serve_until_signal"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xlaserve.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"xlaserve.serve.{module}"), name)
