"""Review regressions for serve/bridge.py's RequestHandle."""

from __future__ import annotations

import asyncio
from typing import Any

from xlaserve.runtime.request import RequestOutput
from xlaserve.serve.bridge import RequestHandle, StreamEvent


class _FakeBridge:
    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.forgotten: list[Any] = []

    def _forget(self, handle: Any) -> None:
        self.forgotten.append(handle)

    def _send(self, command: Any) -> None:
        self.sent.append(command)


def test_close_after_undelivered_final_ends_every_sample_once() -> None:
    """A sample's real final event is queued (delivered by the loop thread, not yet read) when
    the handle is closed: the reader must still get exactly one final event per sample."""

    async def go() -> list[tuple[int, str | None]]:
        bridge = _FakeBridge()
        h = RequestHandle(bridge, "client", "r0", 2)  # type: ignore[arg-type]
        done = RequestOutput("r0#0", (7,), "x", True, "length")
        h._queue.put_nowait(StreamEvent(0, done))  # delivered before close, not yet read
        h.close()  # e.g. an Abort RPC
        seen = []
        async for ev in h:
            seen.append((ev.index, ev.output.finish_reason))
        return seen

    seen = asyncio.run(asyncio.wait_for(go(), 5))
    assert sorted(i for i, _ in seen) == [0, 1], seen
    assert seen[0] == (0, "length")
