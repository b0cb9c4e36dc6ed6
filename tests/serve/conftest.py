"""Fixtures for server tests: an in-process gRPC server on loopback around a mock engine."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

# pytest puts this folder on sys.path (rootdir-relative "prepend" import mode).
from mock_engine import make_engine, tiny_tokenizer
from xlaserve.serve.grpc_server import BackgroundServer, ServerOptions
from xlaserve.serve.proto.messages import NATIVE_SERVICE, Stub


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture
def start_server(tokenizer: Any) -> Iterator[Callable[..., BackgroundServer]]:
    """start_server(engine_factory=None, **options) -> a running BackgroundServer."""
    with contextlib.ExitStack() as stack:
        def start(engine_factory: Callable[[], Any] | None = None, *, step_delay_s: float = 0.0,
                  engine_kwargs: dict[str, Any] | None = None,
                  **options: Any) -> BackgroundServer:
            factory = engine_factory or (lambda: make_engine(
                step_delay_s=step_delay_s, tokenizer=tokenizer, **(engine_kwargs or {})))
            opts = ServerOptions(**{"model_name": "mock", "port": 0, "metrics_port": 0,
                                    **options})
            return stack.enter_context(BackgroundServer(factory, opts, ready_timeout_s=60))
        yield start


@pytest.fixture
def mock_server(start_server: Callable[..., BackgroundServer]) -> BackgroundServer:
    return start_server()


@pytest.fixture
def native_stub(mock_server: BackgroundServer) -> Iterator[Stub]:
    with grpc.insecure_channel(mock_server.target) as channel:
        yield Stub(channel, NATIVE_SERVICE)
