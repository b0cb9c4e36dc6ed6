"""grpc.health.v1 for the server: NOT_SERVING while loading, SERVING once warmed up,
NOT_SERVING while engine steps keep failing (3 in a row; SERVING again after one succeeds), and
NOT_SERVING for good once draining starts. Wraps grpc_health's asyncio servicer.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


class HealthReporter:
    """Owns the health servicer and the status of the server ("") and each named service."""

    def __init__(self, services: tuple[str, ...]) -> None:
        self.services = ("",) + tuple(services)
        # grpc_health exposes its asyncio servicer as `health.aio` (untyped re-export).
        self.servicer = health.aio.HealthServicer()  # pyright: ignore[reportAttributeAccessIssue]

    def add_to(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self.services:
            await self.servicer.set(name, status)

    async def drain(self) -> None:
        """NOT_SERVING from now on; later set_serving calls are ignored."""
        await self.servicer.enter_graceful_shutdown()
