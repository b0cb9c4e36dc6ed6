"""The gRPC server: native xlaserve.v1, KServe v2, grpc.health.v1, reflection and /metrics.

Start-up order: the gRPC port opens at once with health NOT_SERVING, the engine loads and warms
up in the bridge's loop thread, then health turns SERVING. Shutdown (SIGTERM/SIGINT, or
``shutdown()``): health NOT_SERVING, new requests get UNAVAILABLE, in-flight requests drain up to
a timeout, the rest are aborted, then the server stops. This module wires parts together; it
holds no request logic.

With grpcurl (reflection serves every service's descriptors):
  grpcurl -plaintext localhost:50051 list
  grpcurl -plaintext -d '{"text": "Hello", "stream": true, "sampling": {"max_tokens": 8}}' \
      localhost:50051 xlaserve.v1.XlaserveService/Generate
  grpcurl -plaintext localhost:50051 grpc.health.v1.Health/Check
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any, Self

import grpc
from grpc_reflection.v1alpha import reflection
from xlaserve.serve.bridge import EngineBridge, EngineLike
from xlaserve.serve.health import HealthReporter
from xlaserve.serve.kserve_servicer import KServeServicer
from xlaserve.serve.metrics import ServerMetrics
from xlaserve.serve.native_servicer import NativeServicer
from xlaserve.serve.proto.messages import KSERVE_SERVICE, NATIVE_SERVICE, protos, service_handler

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """Network and robustness settings of one server."""

    model_name: str  # the name clients use (KServe model_name, native `model`)
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port (see GrpcServer.port)
    metrics_port: int | None = 9090  # None: no /metrics endpoint; 0: any free port
    max_in_flight: int = 256  # running + waiting requests; past it RESOURCE_EXHAUSTED
    max_request_bytes: int = 4 * 1024 * 1024  # larger requests get INVALID_ARGUMENT
    drain_timeout_s: float = 30.0  # how long shutdown waits for in-flight requests

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError(f"model_name={self.model_name!r}: must be set")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r}: must be in [0, 65535]")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port={self.metrics_port!r}: must be in [0, 65535]")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight={self.max_in_flight!r}: must be >= 1")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes={self.max_request_bytes!r}: must be >= 1024")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s={self.drain_timeout_s!r}: must be >= 0")


class GrpcServer:
    """One serving process's gRPC server around an engine built by `engine_factory`."""

    def __init__(self, engine_factory: Callable[[], EngineLike], options: ServerOptions) -> None:
        self.options = options
        self.metrics = ServerMetrics()
        self.bridge = EngineBridge(engine_factory, self.metrics,
                                   max_in_flight=options.max_in_flight)
        self.health = HealthReporter((NATIVE_SERVICE, KSERVE_SERVICE))
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._httpd: Any = None
        self._stopped = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._health_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Opens the ports and starts loading the engine (returns before it is ready)."""
        opts = self.options
        # gRPC's own limit sits above ours so that oversized requests reach the servicer and get
        # INVALID_ARGUMENT naming the message, rather than gRPC's RESOURCE_EXHAUSTED.
        limit = 2 * opts.max_request_bytes + (1 << 20)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                          ("grpc.max_send_message_length", limit)])
        server.add_generic_rpc_handlers((
            service_handler(NATIVE_SERVICE, NativeServicer(self.bridge, opts.model_name,
                                                           opts.max_request_bytes)),
            service_handler(KSERVE_SERVICE, KServeServicer(self.bridge, opts.model_name,
                                                           opts.max_request_bytes)),
        ))
        self.health.add_to(server)
        await self.health.set_serving(False)
        reflection.enable_server_reflection(
            (NATIVE_SERVICE, KSERVE_SERVICE, "grpc.health.v1.Health", reflection.SERVICE_NAME),
            server, pool=protos().pool)
        self.port = server.add_insecure_port(f"{opts.host}:{opts.port}")
        if self.port == 0:
            raise OSError(f"port={opts.port}: could not bind {opts.host}:{opts.port}")
        await server.start()
        self._server = server
        if opts.metrics_port is not None:
            self._httpd, self.metrics_port = self.metrics.start_http(opts.host, opts.metrics_port)
        self.bridge.on_health = self._on_engine_health
        self.bridge.start()
        self._watcher = asyncio.create_task(self._watch_load())
        log.info("xlaserve gRPC on %s:%d, metrics on %s", opts.host, self.port, self.metrics_port)

    def _on_engine_health(self, healthy: bool) -> None:
        """Engine steps failing in a row (or recovering) flip health; ignored once draining."""
        task = asyncio.create_task(self.health.set_serving(healthy))
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _watch_load(self) -> None:
        await asyncio.to_thread(self.bridge.loaded.wait)
        if self.bridge.load_error is not None:
            log.error("engine failed to load: %s", self.bridge.load_error)
            self._stopped.set()
            return
        await self.bridge.ready.wait()
        await self.health.set_serving(True)
        log.info("model %r ready: health SERVING", self.options.model_name)

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Waits until the engine is loaded and warmed up.

        Raises:
          RuntimeError: the engine failed to load. TimeoutError: `timeout_s` passed.
        """
        await asyncio.wait_for(asyncio.to_thread(self.bridge.loaded.wait), timeout_s)
        if self.bridge.load_error is not None:
            raise RuntimeError(f"engine failed to load: {self.bridge.load_error}")
        await asyncio.wait_for(self.bridge.ready.wait(), timeout_s)
        await asyncio.sleep(0)  # let _watch_load flip health to SERVING

    async def shutdown(self, drain_timeout_s: float | None = None) -> bool:
        """Drains and stops. Returns True when every in-flight request finished in time."""
        timeout = self.options.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self.bridge.draining = True
        await self.health.drain()
        drained = await self.bridge.wait_idle(timeout)
        if not drained:
            log.warning("drain timeout: aborting %d requests", self.bridge.num_in_flight)
            self.bridge.abort_all("the server is shutting down")
            await self.bridge.wait_idle(2.0)
        if self._server is not None:
            await self._server.stop(grace=1.0)
        await asyncio.to_thread(self.bridge.stop)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._watcher is not None:
            self._watcher.cancel()
        self._stopped.set()
        return drained

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    @property
    def failed(self) -> bool:
        return self.bridge.load_error is not None


async def serve_until_signal(engine_factory: Callable[[], EngineLike], options: ServerOptions,
                             on_started: Callable[[GrpcServer], None] | None = None) -> int:
    """Serves until SIGTERM/SIGINT, then drains. Returns the process exit code.

    Args:
      on_started: called once the ports are open (the engine may still be loading).
    Returns:
      0 after a signal and a drain; 1 when the engine failed to load.
    """
    server = GrpcServer(engine_factory, options)
    await server.start()
    if on_started is not None:
        on_started(server)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(server.wait_stopped())
    signalled = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if server.failed:
        await server.shutdown(0)
        return 1
    log.info("signal received: draining for up to %.0f s", options.drain_timeout_s)
    await server.shutdown()
    return 0


class BackgroundServer:
    """Runs a GrpcServer on an event loop in a daemon thread (tests, notebooks).

    ``with BackgroundServer(factory, options) as srv: ...`` starts it, waits until it is ready,
    and shuts it down on exit. ``srv.server`` is the GrpcServer; ``srv.call(coro)`` runs a
    coroutine on the server's loop.
    """

    def __init__(self, engine_factory: Callable[[], EngineLike], options: ServerOptions,
                 ready_timeout_s: float = 300.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="xlaserve-grpc",
                                        daemon=True)
        self.server = GrpcServer(engine_factory, options)
        self.ready_timeout_s = ready_timeout_s

    def submit(self, coro: Any) -> concurrent.futures.Future[Any]:
        """Schedules a coroutine on the server's loop; returns its future."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, coro: Any, timeout_s: float | None = None) -> Any:
        """Runs a coroutine on the server's loop and waits for its result."""
        return self.submit(coro).result(timeout_s)

    def start(self) -> None:
        """Starts the loop thread and opens the ports, without waiting for the engine."""
        self._thread.start()
        self.call(self.server.start())

    @property
    def target(self) -> str:
        return f"{self.server.options.host}:{self.server.port}"

    def __enter__(self) -> Self:
        self.start()
        try:
            self.call(self.server.wait_ready(self.ready_timeout_s))
        except BaseException:
            self.close()
            raise
        return self

    def close(self, drain_timeout_s: float = 5.0) -> None:
        if self._loop.is_running():
            self.call(self.server.shutdown(drain_timeout_s))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __exit__(self, *exc: object) -> None:
        self.close()
