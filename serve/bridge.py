"""Engine thread <-> asyncio bridge: the engine loop runs in its own thread, never blocked.

The loop thread builds and owns the Engine (nothing else touches it after start-up, except
read-only attributes such as the tokenizer and configs). asyncio handlers submit add/abort
commands through a thread-safe queue; after each step the loop thread hands that step's
RequestOutputs to the event loop with one ``loop.call_soon_threadsafe`` call, which puts them on
per-request asyncio queues.

Failure isolation: a failing ``add_request`` fails only its request; an exception from
``engine.step()`` that carries a ``request_id`` attribute naming an in-flight request fails only
that request; any other step exception aborts every in-flight request with the error. Either
way the loop keeps serving. The bridge never validates user input: handlers do that first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from xlaserve.runtime.request import RequestOutput, SamplingParams
from xlaserve.serve.metrics import ServerMetrics

log = logging.getLogger(__name__)


class EngineLike(Protocol):
    """The part of runtime/engine.py's Engine that the bridge drives."""

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling: SamplingParams) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...

    def has_work(self) -> bool: ...

    def stats(self) -> Any: ...


class QueueFullError(Exception):
    """The server holds as many requests as it may; maps to RESOURCE_EXHAUSTED."""


class NotAcceptingError(Exception):
    """The engine is still loading, failed to load, or the server is draining; UNAVAILABLE."""


class DuplicateRequestError(ValueError):
    """A running request already has this id; INVALID_ARGUMENT."""


@dataclasses.dataclass(frozen=True)
class Timings:
    """Wall-clock durations of one finished sample, in seconds."""

    queue_s: float  # arrival at the server -> accepted by the engine
    time_to_first_token_s: float
    end_to_end_s: float
    mean_inter_token_s: float


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """One RequestOutput of one sample, as a handler sees it."""

    index: int  # sample index in [0, n)
    output: RequestOutput  # request_id is the engine's id, not the client's
    timings: Timings | None = None  # set on the sample's final event
    # On failed events: the gRPC status name to answer with (INVALID_ARGUMENT when the engine
    # refused the input, UNAVAILABLE when shutting down, INTERNAL otherwise).
    status: str | None = None


@dataclasses.dataclass
class _Tracked:
    """Loop-thread bookkeeping of one request (touched by the loop thread only)."""

    stream: RequestHandle
    arrival: float
    n: int
    accepted: float = 0.0
    first_token: dict[int, float] = dataclasses.field(default_factory=dict)
    last_token: dict[int, float] = dataclasses.field(default_factory=dict)
    num_tokens: dict[int, int] = dataclasses.field(default_factory=dict)
    finished: set[int] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True)
class _Closed:
    """Queued by RequestHandle.close() for an open sample; read as its "abort" final."""

    index: int


class RequestHandle:
    """A submitted request: iterate it (``async for event in handle``) until every sample ended.

    ``close()`` aborts the request if it has not finished; handlers call it in ``finally`` so a
    cancelled or disconnected client frees its pages at the next step.
    """

    def __init__(self, bridge: EngineBridge, request_id: str, engine_id: str, n: int,
                 num_prompt_tokens: int = 0) -> None:
        self.request_id = request_id
        self.engine_id = engine_id
        self._bridge = bridge
        self._queue: asyncio.Queue[StreamEvent | _Closed] = asyncio.Queue()
        self._remaining = n
        self._open = set(range(n))  # sample indices without a final event yet
        self._closed = False
        self._num_prompt_tokens = num_prompt_tokens
        self._last: dict[int, RequestOutput] = {}  # each sample's latest output read

    def __aiter__(self) -> RequestHandle:
        return self

    async def _get(self) -> StreamEvent:
        item = await self._queue.get()
        if not isinstance(item, _Closed):
            return item
        # Built when read, so that its usage counts what the reader got before it.
        last = self._last.get(item.index)
        out = RequestOutput(
            request_id=self.engine_id, new_token_ids=(), new_text="", finished=True,
            finish_reason="abort",
            num_prompt_tokens=last.num_prompt_tokens if last else self._num_prompt_tokens,
            num_output_tokens=last.num_output_tokens if last else 0,
            num_cached_tokens=last.num_cached_tokens if last else 0)
        return StreamEvent(item.index, out)

    async def __anext__(self) -> StreamEvent:
        if self._remaining == 0:
            raise StopAsyncIteration
        event = await self._get()
        while event.output.finished and event.index not in self._open:
            # A second final for one sample: close() queued a synthetic "abort" for a sample
            # whose real final was already queued but not yet read. Drop it.
            event = await self._get()
        self._last[event.index] = event.output
        if event.output.finished:
            self._open.discard(event.index)
            self._remaining -= 1
            if self._remaining == 0:
                self._bridge._forget(self)
        return event

    @property
    def done(self) -> bool:
        return self._remaining == 0

    def close(self) -> None:
        """Aborts the request unless every sample already finished. Idempotent.

        A reader still iterating (an Abort RPC closed the handle) gets a final "abort" event
        for each open sample, so its stream ends at once.
        """
        if self._closed:
            return
        self._closed = True
        if self._remaining:
            self._bridge._forget(self)
            self._bridge._send(("abort", self.engine_id, None))
            for index in sorted(self._open):
                self._queue.put_nowait(_Closed(index))


class EngineBridge:
    """Runs an engine loop thread and connects it to one asyncio event loop.

    Args:
      engine_factory: builds (and warms up) the engine; runs in the loop thread.
      metrics: updated from the loop thread after each step.
      max_in_flight: requests the server holds at once (running + waiting); past it,
        ``submit`` raises QueueFullError at once.
      idle_wait_s: how long the idle loop sleeps between checks for commands.
    """

    def __init__(self, engine_factory: Callable[[], EngineLike], metrics: ServerMetrics, *,
                 max_in_flight: int, idle_wait_s: float = 0.05,
                 unhealthy_after_failed_steps: int = 3) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight={max_in_flight!r}: must be >= 1")
        self._factory = engine_factory
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[tuple[str, str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestHandle] = {}  # client id -> handle; event-loop side only
        self._ids = itertools.count()
        self.engine: Any = None  # set once loaded; read-only for other threads
        self.load_error: BaseException | None = None
        self.ready = asyncio.Event()  # set when the engine is loaded and warmed up
        self.loaded = threading.Event()  # set when loading ended, well or not
        self.draining = False
        # Health: after this many engine steps failed in a row the engine is reported unhealthy
        # (health NOT_SERVING, so a load balancer stops sending work), healthy again after the
        # next step that succeeds. `on_health` runs on the event loop with the new state.
        self.unhealthy_after_failed_steps = unhealthy_after_failed_steps
        self.on_health: Callable[[bool], None] | None = None
        self._failed_steps = 0  # consecutive; loop-thread side

    # ---- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        """Starts the loop thread. Call from the event loop that will run the handlers."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="xlaserve-engine", daemon=True)
        self._thread.start()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def submit(self, request_id: str, prompt_token_ids: list[int],
               sampling: SamplingParams) -> RequestHandle:
        """Queues a validated request. Must run on the event loop.

        Raises:
          NotAcceptingError: not ready, or draining. QueueFullError: at capacity.
          DuplicateRequestError: `request_id` is in flight.
        """
        if self.draining:
            raise NotAcceptingError("the server is shutting down")
        if not self.ready.is_set():
            raise NotAcceptingError("the model is not loaded yet" if self.load_error is None
                                    else f"the model failed to load: {self.load_error}")
        if request_id in self._streams:
            raise DuplicateRequestError(f"request_id={request_id!r}: already running")
        if len(self._streams) >= self.max_in_flight:
            self.metrics.rejected.inc()
            raise QueueFullError(f"{len(self._streams)} requests in flight (the limit is "
                                 f"{self.max_in_flight}); retry later")
        engine_id = f"r{next(self._ids)}"
        handle = RequestHandle(self, request_id, engine_id, sampling.n,
                               num_prompt_tokens=len(prompt_token_ids))
        self._streams[request_id] = handle
        self._send(("add", engine_id, (handle, list(prompt_token_ids), sampling,
                                       time.monotonic())))
        return handle

    def abort(self, request_id: str) -> bool:
        """Aborts a running request by its client id; False when none has that id."""
        handle = self._streams.get(request_id)
        if handle is None:
            return False
        handle.close()
        return True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Waits until no request is in flight or `timeout_s` passed; True when idle."""
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self._streams

    def abort_all(self, reason: str) -> None:
        """Fails every in-flight request with `reason` (used past the drain timeout)."""
        self._send(("abort_all", "", reason))

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the loop thread (in-flight requests are dropped) and waits for it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _forget(self, handle: RequestHandle) -> None:
        if self._streams.get(handle.request_id) is handle:
            del self._streams[handle.request_id]

    def _send(self, command: tuple[str, str, Any]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, events: list[tuple[RequestHandle, StreamEvent]]) -> None:
        for handle, event in events:
            handle._queue.put_nowait(event)

    def _set_ready(self) -> None:
        self.ready.set()

    # ---- loop-thread side ------------------------------------------------------------------

    def _run(self) -> None:
        assert self._loop is not None  # internal invariant: start() sets it
        try:
            self.engine = self._factory()
        except BaseException as e:  # reported through load_error and health
            log.exception("engine failed to load")
            self.load_error = e
            self.loaded.set()
            return
        self.loaded.set()
        self._loop.call_soon_threadsafe(self._set_ready)
        tracked: dict[str, _Tracked] = {}
        self.metrics.observe_stats(self.engine.stats())
        while not self._stop.is_set():
            events: list[tuple[RequestHandle, StreamEvent]] = []
            try:
                self._iteration(tracked, events)
            except Exception as e:  # a bug here must not hang every client
                log.exception("engine loop iteration failed; aborting %d requests",
                              len(tracked))
                self._fail_all(tracked, events, f"engine loop failed: {e!r}")
            if events:
                try:
                    self._loop.call_soon_threadsafe(self._deliver, events)
                except RuntimeError:  # the event loop closed under us: nobody is listening
                    log.warning("event loop closed; engine loop thread exits")
                    return
            if not self._has_work():
                # A command sent after this clear() sets the event again, and one sent before it
                # is already queued: the next iteration drains the queue either way.
                self._wake.wait(self._idle_wait_s)
                self._wake.clear()

    def _has_work(self) -> bool:
        try:
            return bool(self.engine.has_work())
        except Exception:  # logged; treated as idle so the loop keeps turning
            log.exception("engine.has_work() failed")
            return False

    def _iteration(self, tracked: dict[str, _Tracked],
                   events: list[tuple[RequestHandle, StreamEvent]]) -> None:
        """One pass: apply commands, run a step if there is work, refresh the gauges."""
        self._apply_commands(tracked, events)
        if self.engine.has_work():
            t0 = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as e:  # the step as a whole failed: its state is unknown
                # One request's failure inside the step (its text, its stop strings) is ended by
                # the engine itself with an error final; what reaches here is a failure of the
                # step (device, runner, a bug), after which no in-flight request can be trusted.
                # Fail them all and keep serving.
                outputs = []
                log.exception("engine step failed; aborting %d requests", len(tracked))
                self._fail_all(tracked, events, f"engine step failed: {e!r}")
                self._step_result(ok=False)
            else:
                self._step_result(ok=True)
            self.metrics.step_time.observe(time.perf_counter() - t0)
            self._route(tracked, outputs, events)
        self.metrics.observe_stats(self.engine.stats())

    def _step_result(self, ok: bool) -> None:
        """Counts failed steps in a row; tells `on_health` when the engine turns (un)healthy."""
        before = self._failed_steps < self.unhealthy_after_failed_steps
        self._failed_steps = 0 if ok else self._failed_steps + 1
        if not ok:
            self.metrics.failed_steps.inc()
        after = self._failed_steps < self.unhealthy_after_failed_steps
        if after != before:
            log.warning("engine %s: %d step(s) failed in a row", "recovered" if after
                        else "unhealthy", self.unhealthy_after_failed_steps)
            if self.on_health is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(self.on_health, after)

    def _apply_commands(self, tracked: dict[str, _Tracked],
                        events: list[tuple[RequestHandle, StreamEvent]]) -> None:
        while True:
            try:
                kind, engine_id, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                handle, prompt, sampling, arrival = payload
                record = _Tracked(handle, arrival, sampling.n)
                try:
                    self.engine.add_request(engine_id, prompt, sampling)
                except Exception as e:  # noqa: BLE001 (fails only this request)
                    log.warning("add_request(%s) failed: %s", engine_id, e)
                    status = "INVALID_ARGUMENT" if isinstance(e, ValueError) else "INTERNAL"
                    for i in range(sampling.n):
                        events.append((handle, self._error_event(engine_id, i, str(e), status)))
                    self.metrics.requests.labels(finish_reason="error").inc()
                    continue
                record.accepted = time.monotonic()
                tracked[engine_id] = record
            elif kind == "abort":
                if tracked.pop(engine_id, None) is not None:
                    self._engine_abort(engine_id)
                    self.metrics.requests.labels(finish_reason="abort").inc()
            elif kind == "abort_all":
                self._fail_all(tracked, events, str(payload), "UNAVAILABLE")

    def _engine_abort(self, engine_id: str) -> None:
        try:
            self.engine.abort(engine_id)
        except Exception:  # the request is gone either way; keep serving
            log.exception("engine.abort(%s) failed", engine_id)

    def _fail_all(self, tracked: dict[str, _Tracked],
                  events: list[tuple[RequestHandle, StreamEvent]], reason: str,
                  status: str = "INTERNAL") -> None:
        for engine_id in list(tracked):
            self._fail_one(tracked, engine_id, events, reason, status)

    def _fail_one(self, tracked: dict[str, _Tracked], engine_id: str,
                  events: list[tuple[RequestHandle, StreamEvent]], reason: str,
                  status: str = "INTERNAL") -> None:
        record = tracked.pop(engine_id)
        self._engine_abort(engine_id)
        for i in range(record.n):
            if i not in record.finished:
                events.append((record.stream, self._error_event(engine_id, i, reason, status)))
        self.metrics.requests.labels(finish_reason="error").inc()

    @staticmethod
    def _error_event(engine_id: str, index: int, error: str,
                     status: str = "INTERNAL") -> StreamEvent:
        out = RequestOutput(request_id=engine_id, new_token_ids=(), new_text="", finished=True,
                            finish_reason="abort", error=error)
        return StreamEvent(index, out, status=status)

    def _route(self, tracked: dict[str, _Tracked], outputs: list[RequestOutput],
               events: list[tuple[RequestHandle, StreamEvent]]) -> None:
        now = time.monotonic()
        for out in outputs:
            base, _, suffix = out.request_id.partition("#")
            record = tracked.get(base)
            if record is None:
                continue  # aborted meanwhile
            index = int(suffix) if suffix else 0
            timings = None
            if out.new_token_ids:
                count = len(out.new_token_ids)
                self.metrics.generated_tokens.inc(count)
                if index not in record.first_token:
                    record.first_token[index] = now
                    self.metrics.ttft.observe(now - record.arrival)
                else:
                    self.metrics.itl.observe((now - record.last_token[index]) / count)
                record.last_token[index] = now
                record.num_tokens[index] = record.num_tokens.get(index, 0) + count
            if out.finished:
                record.finished.add(index)
                first = record.first_token.get(index, now)
                num = record.num_tokens.get(index, 0)
                timings = Timings(
                    queue_s=record.accepted - record.arrival,
                    time_to_first_token_s=first - record.arrival,
                    end_to_end_s=now - record.arrival,
                    mean_inter_token_s=(now - first) / (num - 1) if num > 1 else 0.0)
                self.metrics.e2e.observe(now - record.arrival)
                if len(record.finished) == record.n:
                    del tracked[base]
                    reason = "error" if out.error else (out.finish_reason or "unknown")
                    self.metrics.requests.labels(finish_reason=reason).inc()
            events.append((record.stream, StreamEvent(index, out, timings)))
