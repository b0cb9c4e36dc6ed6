"""Must-show tests with the real tiny model (builtin:tiny) behind a real server on loopback.

One engine is built per module (loading + compiling every bucket dominates the cost). The offline
API runs on it first, on this thread, to give the reference outputs; then the server's engine
thread takes it over. Building the engine takes ~10 s with a warm XLA compilation cache and about
a minute cold on 2 busy CPU cores; each test is quick after that.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from xlaserve.serve.client import XlaserveClient, build_generate_request
from xlaserve.serve.grpc_server import BackgroundServer, ServerOptions
from xlaserve.serve.proto.messages import NATIVE_SERVICE, Stub

NUM_PROMPTS = 64
MAX_TOKENS = 8
WORDS = ["cat", "dog", "river", "king", "storm", "apple", "train", "song"]


def _prompts() -> list[str]:
    return [f"Once upon a time the {WORDS[i % 8]} and the {WORDS[(i // 8) % 8]} went {i} miles"
            for i in range(NUM_PROMPTS)]


@pytest.fixture(scope="module")
def tiny() -> Iterator[tuple[BackgroundServer, list[str], list[Any]]]:
    from xlaserve.runtime.engine import Engine
    from xlaserve.runtime.llm import LLM
    from xlaserve.runtime.request import SamplingParams

    from xlaserve.engine_args import engine_config_from_options

    config = engine_config_from_options("builtin:tiny", max_num_batched_tokens=64,
                                        max_num_seqs=16, num_pages=256, max_model_len=256,
                                        dtype="float32")
    engine = Engine.from_config(config)
    prompts = _prompts()
    reference = LLM(engine=engine).generate(prompts, SamplingParams(max_tokens=MAX_TOKENS,
                                                                    temperature=0.0))
    options = ServerOptions(model_name="tiny", port=0, metrics_port=0,
                            max_in_flight=NUM_PROMPTS)
    with BackgroundServer(lambda: engine, options) as srv:
        yield srv, prompts, reference


def _metric(srv: BackgroundServer, name: str, labels: dict[str, str] | None = None) -> float:
    v = srv.server.metrics.value(name, labels)
    return 0.0 if v is None else v


def test_64_concurrent_streams_equal_offline(tiny: Any) -> None:
    srv, prompts, reference = tiny

    async def run() -> list[tuple[list[int], str, Any]]:
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = Stub(channel, NATIVE_SERVICE)

            async def one(prompt: str) -> tuple[list[int], str, Any]:
                req = build_generate_request(prompt, stream=True, max_tokens=MAX_TOKENS,
                                             temperature=0.0)
                ids, text, final = [], [], None
                async for resp in stub.Generate(req, timeout=120):
                    ids.extend(resp.delta.token_ids)
                    text.append(resp.delta.text)
                    if resp.HasField("final"):
                        final = resp.final
                return ids, "".join(text), final

            return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(run())
    assert len(results) == NUM_PROMPTS
    for (ids, text, final), ref in zip(results, reference, strict=True):
        assert final is not None
        assert ids == list(ref.token_ids)
        assert text == ref.text
        assert final.completion_tokens == len(ids)
    assert _metric(srv, "xlaserve_compiles_after_warmup_total") == 0


def test_tritonclient_gets_the_right_text(tiny: Any) -> None:
    import tritonclient.grpc as triton

    srv, prompts, reference = tiny
    inp = triton.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([prompts[5].encode()], dtype=np.object_))
    client = triton.InferenceServerClient(srv.target)
    try:
        params = {"max_tokens": MAX_TOKENS, "temperature": "0"}
        result = client.infer("tiny", [inp], parameters=params)
        assert result.as_numpy("text_output")[0].decode() == reference[5].text
        got: queue.Queue[Any] = queue.Queue()
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer("tiny", [inp], request_id="t", parameters=params)
        pieces, final = [], False
        while not final:
            r, e = got.get(timeout=60)
            assert e is None, e
            pieces.append(r.as_numpy("text_output")[0].decode())
            final = r.get_response().parameters["triton_final_response"].bool_param
        assert "".join(pieces) == reference[5].text
    finally:
        client.stop_stream()
        client.close()


def test_logit_bias_through_both_protocols(tiny: Any) -> None:
    """logit_bias reaches the engine from the native API (a map field) and KServe (a JSON
    parameter): +100 on a token makes every greedy token that token; a token id past the
    vocabulary is INVALID_ARGUMENT naming the field."""
    import tritonclient.grpc as triton

    srv, _, _ = tiny
    with XlaserveClient(srv.target, timeout_s=120) as c:
        out = c.generate("Once upon a time", max_tokens=4, temperature=0.0, ignore_eos=True,
                         logit_bias={77: 100.0})
        assert list(out.token_ids) == [77] * 4
        for bad in ({10**6: 1.0}, {i: (200.0 if i == 7 else 1.0) for i in range(1000)}):
            with pytest.raises(grpc.RpcError) as info:
                c.generate("hi", max_tokens=2, logit_bias=bad)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # small message too
            assert "logit_bias" in info.value.details() and len(info.value.details()) < 300
        pairs = c.generate("Once upon a time", max_tokens=4, temperature=0.0, ignore_eos=True,
                           logit_bias=((77, 100.0),))  # SamplingParams' own pairs form
        assert list(pairs.token_ids) == [77] * 4
    client = triton.InferenceServerClient(srv.target)
    try:
        inp = triton.InferInput("text_input", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"Once upon a time"], dtype=np.object_))
        result = client.infer("tiny", [inp], parameters={
            "max_tokens": 4, "temperature": "0", "ignore_eos": True,
            "logit_bias": '{"77": 100}'})
        assert result.as_numpy("text_output")[0].decode() == out.text
    finally:
        client.close()


def test_cancel_frees_pages_and_server_keeps_serving(tiny: Any) -> None:
    srv, prompts, reference = tiny
    aborted = _metric(srv, "xlaserve_requests_total", {"finish_reason": "abort"})
    with XlaserveClient(srv.target, timeout_s=120) as c:
        stream = c.generate_stream("A very long tale", max_tokens=200, temperature=0.0,
                                   ignore_eos=True)
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()
        deadline = time.monotonic() + 10
        while (_metric(srv, "xlaserve_kv_pages_used") > 0
               or _metric(srv, "xlaserve_running_sequences") > 0):
            assert time.monotonic() < deadline, "pages were not freed"
            time.sleep(0.01)
        assert _metric(srv, "xlaserve_requests_total", {"finish_reason": "abort"}) == aborted + 1
        out = c.generate(prompts[0], max_tokens=MAX_TOKENS, temperature=0.0)
        assert out.text == reference[0].text
        assert c.health() == "SERVING"
        with pytest.raises(grpc.RpcError) as info:
            c.generate(token_ids=[7] * 300, max_tokens=4)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info_msg = c.model_info()
        assert info_msg.context_length == 256 and list(info_msg.seq_buckets) == [8, 16]


def test_overload_resource_exhausted_then_healthy(tiny: Any) -> None:
    srv, prompts, reference = tiny

    async def run() -> None:
        async with grpc.aio.insecure_channel(srv.target) as channel:
            stub = Stub(channel, NATIVE_SERVICE)
            calls = [stub.Generate(build_generate_request(p, stream=True, max_tokens=200,
                                                          ignore_eos=True), timeout=120)
                     for p in prompts]
            deadline = time.monotonic() + 30
            while srv.server.bridge.num_in_flight < NUM_PROMPTS:
                assert time.monotonic() < deadline, srv.server.bridge.num_in_flight
                await asyncio.sleep(0.01)
            extra = stub.Generate(build_generate_request("one more", max_tokens=2), timeout=30)
            with pytest.raises(grpc.RpcError) as info:
                async for _ in extra:
                    pass
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for call in calls:
                call.cancel()

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while (_metric(srv, "xlaserve_kv_pages_used") > 0 or srv.server.bridge.num_in_flight
           or _metric(srv, "xlaserve_running_sequences") > 0):
        assert time.monotonic() < deadline, "cancelled requests still hold pages"
        time.sleep(0.01)
    with XlaserveClient(srv.target, timeout_s=60) as c:
        assert c.health() == "SERVING"
        assert c.generate(prompts[1], max_tokens=MAX_TOKENS, temperature=0.0).text == \
            reference[1].text
