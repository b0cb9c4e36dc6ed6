"""Cancellation, deadlines, overload, failure isolation, health and draining (mock engine)."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mock_engine import ADD_POISON, STEP_POISON, make_engine
from xlaserve.serve.client import XlaserveClient, build_generate_request
from xlaserve.serve.grpc_server import BackgroundServer
from xlaserve.serve.proto.messages import NATIVE_SERVICE, Stub, protos


def _wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def _value(srv: BackgroundServer, name: str, labels: dict[str, str] | None = None) -> float:
    v = srv.server.metrics.value(name, labels)
    return 0.0 if v is None else v


def test_cancel_mid_stream_frees_pages(start_server: Any) -> None:
    srv = start_server(step_delay_s=0.01)
    with XlaserveClient(srv.target, timeout_s=30) as c:
        stream = c.generate_stream("a long story " * 4, max_tokens=200, temperature=0.0)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        assert _value(srv, "xlaserve_kv_pages_used") > 0
        stream.close()  # cancels the call
        _wait_for(lambda: _value(srv, "xlaserve_running_sequences") == 0
                  and _value(srv, "xlaserve_kv_pages_used") == 0)
        assert _value(srv, "xlaserve_requests_total", {"finish_reason": "abort"}) == 1
        assert srv.server.bridge.num_in_flight == 0
        assert c.generate("still here", max_tokens=3).completion_tokens == 3


def test_abort_rpc_and_deadline(start_server: Any) -> None:
    srv = start_server(step_delay_s=0.01)
    with XlaserveClient(srv.target, timeout_s=30) as c:
        stream = c.generate_stream("abort me", request_id="victim", max_tokens=200)
        next(stream)
        assert c.abort("victim") is True
        assert c.abort("victim") is False
        rest = list(stream)  # ends at once with an "abort" final
        assert rest[-1].final.finish_reason == protos().native.FINISH_REASON_ABORT
    with XlaserveClient(srv.target, timeout_s=0.3) as c:
        with pytest.raises(grpc.RpcError) as info:
            c.generate("too slow", max_tokens=200)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_for(lambda: _value(srv, "xlaserve_kv_pages_used") == 0
              and srv.server.bridge.num_in_flight == 0)


def test_overload_gets_resource_exhausted(start_server: Any) -> None:
    srv = start_server(step_delay_s=0.01, max_in_flight=3)
    with XlaserveClient(srv.target, timeout_s=30) as c:
        streams = [c.generate_stream(f"hold {i}", max_tokens=200) for i in range(3)]
        for s in streams:
            next(s)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            c.generate("one too many", max_tokens=2)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - t0 < 1.0
        assert _value(srv, "xlaserve_requests_rejected_total") == 1
        assert c.health() == "SERVING"
        for s in streams:
            s.close()
        _wait_for(lambda: srv.server.bridge.num_in_flight == 0)
        assert c.generate("room again", max_tokens=2).completion_tokens == 2


def test_failing_request_fails_alone(start_server: Any) -> None:
    srv = start_server(step_delay_s=0.005)
    with XlaserveClient(srv.target, timeout_s=30) as c:
        bystander = c.generate_stream("innocent", max_tokens=40, temperature=0.0)
        next(bystander)
        for poison in (ADD_POISON, STEP_POISON):
            with pytest.raises(grpc.RpcError) as info:
                c.generate(token_ids=poison, max_tokens=5)
            assert info.value.code() == grpc.StatusCode.INTERNAL
            assert "poisoned" in info.value.details()
        rest = list(bystander)
        assert rest[-1].HasField("final") and not rest[-1].final.error
        assert c.generate("after", max_tokens=2).completion_tokens == 2
    assert _value(srv, "xlaserve_requests_total", {"finish_reason": "error"}) == 2


def test_unattributed_step_failure_keeps_serving(start_server: Any, tokenizer: Any) -> None:
    engine = make_engine(step_delay_s=0.005, tokenizer=tokenizer)
    srv = start_server(lambda: engine)
    with XlaserveClient(srv.target, timeout_s=30) as c:
        stream = c.generate_stream("doomed", max_tokens=100)
        next(stream)
        original = engine.inner.step
        calls = {"n": 0}

        def broken_once() -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("device fell over")
            return original()

        engine.inner.step = broken_once  # type: ignore[method-assign]
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "device fell over" in info.value.details()
        assert c.generate("next", max_tokens=2).completion_tokens == 2
        _wait_for(lambda: _value(srv, "xlaserve_kv_pages_used") == 0)


def test_health_loading_serving_draining(tokenizer: Any) -> None:
    from xlaserve.serve.grpc_server import ServerOptions

    release = threading.Event()

    def slow_factory() -> Any:
        release.wait(30)  # stands in for loading + compiling every bucket
        return make_engine(step_delay_s=0.01, tokenizer=tokenizer)

    opts = ServerOptions(model_name="mock", port=0, metrics_port=0)
    srv = BackgroundServer(slow_factory, opts)
    srv.start()
    try:
        with XlaserveClient(srv.target, timeout_s=10) as c:
            assert c.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as info:
                c.generate("early", max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            release.set()
            srv.call(srv.server.wait_ready(30))
            assert c.health() == "SERVING"
            stream = c.generate_stream("drain me", max_tokens=40)
            next(stream)
            done = srv.submit(srv.server.shutdown(20))
            _wait_for(lambda: srv.server.bridge.draining)
            assert c.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as info:
                c.generate("late", max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(stream)  # the in-flight request finishes
            assert rest[-1].HasField("final") and rest[-1].final.completion_tokens == 40
            assert done.result(20) is True
    finally:
        srv.close()


def test_metrics_endpoint(mock_server: Any) -> None:
    with XlaserveClient(mock_server.target, timeout_s=30) as c:
        c.generate("count me", max_tokens=4)
    port = mock_server.server.metrics_port
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in ("xlaserve_requests_total", "xlaserve_queue_depth",
                 "xlaserve_running_sequences", "xlaserve_kv_pages_used",
                 "xlaserve_kv_pages_cached", "xlaserve_prefix_cache_hit_rate",
                 "xlaserve_preemptions_total", "xlaserve_compiles_after_warmup_total",
                 "xlaserve_step_time_seconds_bucket", "xlaserve_time_to_first_token_seconds_bucket",
                 "xlaserve_inter_token_latency_seconds_bucket",
                 "xlaserve_e2e_latency_seconds_bucket", "xlaserve_generated_tokens_total"):
        assert name in body, name
    assert 'xlaserve_requests_total{finish_reason="length"} 1.0' in body
    assert "xlaserve_generated_tokens_total 4.0" in body


def test_reflection_lists_services(mock_server: Any) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(mock_server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"xlaserve.v1.XlaserveService", "inference.GRPCInferenceService",
                "grpc.health.v1.Health"} <= services
        fd = db.FindFileContainingSymbol("xlaserve.v1.GenerateRequest")
        assert fd.name == "xlaserve/v1/xlaserve.proto"
        fd = db.FindFileContainingSymbol("inference.ModelInferRequest")
        assert fd.package == "inference"
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = Stub(channel, NATIVE_SERVICE)
        resp = list(stub.Generate(build_generate_request("x", max_tokens=1), timeout=10))
        assert len(resp) == 1 and resp[0].HasField("final")


def test_drain_timeout_aborts_with_unavailable(start_server: Any) -> None:
    srv = start_server(step_delay_s=0.01)
    with XlaserveClient(srv.target, timeout_s=30) as c:
        stream = c.generate_stream("endless", max_tokens=200)
        next(stream)
        done = srv.submit(srv.server.shutdown(0.2))
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in info.value.details()
        assert done.result(20) is False


def test_health_not_serving_while_steps_keep_failing(start_server: Any) -> None:
    engine = make_engine(step_delay_s=0.005)
    srv = start_server(lambda: engine)
    original = engine.inner.step
    broken = {"on": True}

    def step() -> Any:
        if broken["on"]:
            raise RuntimeError("device lost")
        return original()

    engine.inner.step = step  # type: ignore[method-assign]
    with XlaserveClient(srv.target, timeout_s=30) as c:
        assert c.health() == "SERVING"
        for i in range(3):  # each request fails with its step; the third failure in a row flips
            with pytest.raises(grpc.RpcError) as info:
                c.generate(f"doomed {i}", max_tokens=2)
            assert info.value.code() == grpc.StatusCode.INTERNAL
        _wait_for(lambda: c.health() == "NOT_SERVING")
        assert _value(srv, "xlaserve_engine_step_failures_total") >= 3
        broken["on"] = False
        assert c.generate("recovered", max_tokens=2).completion_tokens == 2
        _wait_for(lambda: c.health() == "SERVING")
