"""Review regressions for the serving layer: bad input never hurts other requests, undecodable
messages, token-ids-only models, usage on aborted finals, KServe request ids, top_k=-1."""

from __future__ import annotations

import queue
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from mock_engine import make_engine
from tritonclient.utils import InferenceServerException
from xlaserve.serve.client import XlaserveClient
from xlaserve.serve.proto.messages import protos


def _text_input(prompt: str) -> Any:
    inp = triton.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    return inp


def _kserve_request(request_id: str, prompt: str, max_tokens: int) -> Any:
    req = protos().kserve.ModelInferRequest(model_name="mock", id=request_id)
    tensor = req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(prompt.encode())
    req.parameters["max_tokens"].int64_param = max_tokens
    req.parameters["stream"].bool_param = False
    return req


@pytest.mark.parametrize("params,field", [
    ({"top_k": 2**40}, "top_k"),
    ({"min_tokens": 1, "stop_token_ids": "[99999999999]"}, "stop_token_ids"),
])
def test_kserve_out_of_range_ints_fail_alone(start_server: Any, params: dict[str, Any],
                                             field: str) -> None:
    """KServe's int64 parameters can exceed the engine's int32 arrays: such a request must get
    INVALID_ARGUMENT at admission, not break the step and fail every in-flight request."""
    srv = start_server(step_delay_s=0.01)
    with XlaserveClient(srv.target, timeout_s=30) as c:
        bystander = c.generate_stream("bystander", max_tokens=30, temperature=0.0)
        next(bystander)
        client = triton.InferenceServerClient(srv.target)
        try:
            with pytest.raises(InferenceServerException) as info:
                client.infer("mock", [_text_input("hi")], parameters={"max_tokens": 4, **params})
        finally:
            client.close()
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value.message()
        assert field in info.value.message()
        rest = list(bystander)
        assert rest[-1].HasField("final") and not rest[-1].final.error
        assert rest[-1].final.completion_tokens == 30


def test_undecodable_messages_get_invalid_argument(mock_server: Any) -> None:
    """Bytes that do not parse (a string field with bad UTF-8) get INVALID_ARGUMENT; on a
    ModelStreamInfer stream they fail only that request and the stream still ends."""
    bad_generate = b"\x1a\x02\xff\xfe"  # GenerateRequest.text (field 3) = b"\xff\xfe"
    bad_infer = b"\x0a\x02\xff\xfe"  # ModelInferRequest.model_name (field 1) = b"\xff\xfe"
    with grpc.insecure_channel(mock_server.target) as channel:
        generate = channel.unary_stream("/xlaserve.v1.XlaserveService/Generate")
        with pytest.raises(grpc.RpcError) as info:
            list(generate(bad_generate, timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "GenerateRequest" in info.value.details()
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            infer(bad_infer, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        good = _kserve_request("good", "hello", 3).SerializeToString()
        responses = [protos().kserve.ModelStreamInferResponse.FromString(r)
                     for r in stream(iter([bad_infer, good]), timeout=10)]
    errors = [r.error_message for r in responses if r.error_message]
    assert len(errors) == 1 and "INVALID_ARGUMENT" in errors[0], errors
    ok = [r.infer_response for r in responses if not r.error_message]
    assert [r.id for r in ok] == ["good"]
    assert ok[0].parameters["completion_tokens"].int64_param == 3


def test_token_ids_only_model(start_server: Any, tokenizer: Any) -> None:
    """A model without a tokenizer serves token ids; text gets INVALID_ARGUMENT saying so."""
    srv = start_server(lambda: make_engine(tokenizer=tokenizer, text=False))
    with XlaserveClient(srv.target, timeout_s=30) as c:
        out = c.generate(token_ids=[3, 4, 5], max_tokens=3, temperature=0.0)
        assert out.completion_tokens == 3 and len(out.token_ids) == 3
        calls = {
            "generate text": lambda: c.generate("hello", max_tokens=2),
            "generate chat": lambda: c.generate(messages=[{"role": "user", "content": "hi"}]),
            "stop strings": lambda: c.generate(token_ids=[3, 4], stop=["x"], max_tokens=2),
            "tokenize": lambda: c.tokenize("hello"),
            "detokenize": lambda: c.detokenize([3, 4]),
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, info.value)
            assert "tokenizer" in info.value.details(), (name, info.value.details())
    client = triton.InferenceServerClient(srv.target)
    try:
        with pytest.raises(InferenceServerException) as kinfo:
            client.infer("mock", [_text_input("hi")])
        assert kinfo.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "tokenizer" in kinfo.value.message()
    finally:
        client.close()


def test_abort_rpc_final_carries_usage(start_server: Any, tokenizer: Any) -> None:
    """The final of a request ended by the Abort RPC counts the prompt and the tokens sent."""
    srv = start_server(step_delay_s=0.01)
    with XlaserveClient(srv.target, timeout_s=30) as c:
        stream = c.generate_stream("abort me", request_id="victim", max_tokens=200)
        seen = [next(stream) for _ in range(3)]
        assert c.abort("victim") is True
        seen += list(stream)
    final = seen[-1].final
    assert final.finish_reason == protos().native.FINISH_REASON_ABORT
    assert final.prompt_tokens == len(tokenizer.encode("abort me"))
    assert final.completion_tokens == sum(len(r.delta.token_ids) for r in seen) >= 3


def test_kserve_request_ids_need_not_be_unique(start_server: Any) -> None:
    """KServe/Triton request ids are only echoed back: two requests in flight with one id (two
    clients that number their requests alike) must both be served."""
    srv = start_server(step_delay_s=0.01)
    client = triton.InferenceServerClient(srv.target)
    got: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for _ in range(2):
            client.async_stream_infer("mock", [_text_input("same id")], request_id="1",
                                      parameters={"max_tokens": 20, "stream": False})
        for _ in range(2):
            result, error = got.get(timeout=30)
            assert error is None, error
            resp = result.get_response()
            assert resp.id == "1" and resp.parameters["completion_tokens"].int64_param == 20
    finally:
        client.stop_stream()
        client.close()


def test_top_k_minus_one_means_off(start_server: Any, tokenizer: Any) -> None:
    """vLLM and SGLang clients send top_k=-1 for "off"; it must mean the same as top_k=0.

    The mock engine's sampled tokens depend on the seed only, not on top_k: the engine records
    the SamplingParams it is given, which is what the check reads."""
    engine = make_engine(tokenizer=tokenizer)
    seen: list[Any] = []
    add = engine.add_request

    def recording_add(request_id: str, prompt_token_ids: list[int], sampling: Any) -> None:
        seen.append(sampling)
        add(request_id, prompt_token_ids, sampling)
    engine.add_request = recording_add  # type: ignore[method-assign]
    srv = start_server(lambda: engine)
    with XlaserveClient(srv.target, timeout_s=30) as c:
        off = c.generate("hello", max_tokens=6, temperature=1.0, seed=7, top_k=-1)
        zero = c.generate("hello", max_tokens=6, temperature=1.0, seed=7, top_k=0)
        five = c.generate("hello", max_tokens=6, temperature=1.0, seed=7, top_k=5)
        assert off.token_ids == zero.token_ids and off.completion_tokens == 6
    client = triton.InferenceServerClient(srv.target)
    try:
        result = client.infer("mock", [_text_input("hi")], parameters={"top_k": -1,
                                                                        "max_tokens": 2})
        assert result.get_response().parameters["completion_tokens"].int64_param == 2
    finally:
        client.close()
    assert five.completion_tokens == 6
    assert [sp.top_k for sp in seen] == [0, 0, 5, 0]  # native -1, 0, 5; KServe -1
