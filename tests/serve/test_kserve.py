"""KServe v2 / Triton protocol: tritonclient.grpc works unchanged against the server."""

from __future__ import annotations

import queue
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
from mock_engine import make_engine, offline_generate
from tritonclient.utils import InferenceServerException
from xlaserve.runtime.request import SamplingParams
from xlaserve.serve.kserve_servicer import decode_bytes_tensor, encode_bytes_tensor
from xlaserve.serve.proto.messages import protos


def _text_input(prompt: str) -> Any:
    inp = triton.InferInput("text_input", [1], "BYTES")
    inp.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    return inp


def test_field_numbers_match_tritonclient() -> None:
    from tritonclient.grpc import service_pb2

    ours = protos()
    names = ["ModelInferRequest", "ModelInferResponse", "InferParameter", "InferTensorContents",
             "ModelStreamInferResponse", "ServerLiveResponse", "ServerReadyResponse",
             "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataResponse",
             "ModelMetadataRequest", "ModelMetadataResponse",
             "ModelInferRequest.InferInputTensor", "ModelInferRequest.InferRequestedOutputTensor",
             "ModelInferResponse.InferOutputTensor", "ModelMetadataResponse.TensorMetadata"]
    for name in names:
        theirs = service_pb2.DESCRIPTOR.pool.FindMessageTypeByName(f"inference.{name}")
        mine = ours.pool.FindMessageTypeByName(f"inference.{name}")
        assert {(f.name, f.number, f.type) for f in mine.fields} == \
            {(f.name, f.number, f.type) for f in theirs.fields}, name
    theirs_svc = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours.service("inference.GRPCInferenceService").methods:
        other = theirs_svc.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name
        assert method.output_type.full_name == other.output_type.full_name


def test_every_sampling_field_is_a_parameter() -> None:
    from xlaserve.serve.common import SAMPLING_FIELDS
    from xlaserve.serve.kserve_servicer import _FIELD_KINDS

    assert set(_FIELD_KINDS) == set(SAMPLING_FIELDS)


def test_bytes_tensor_roundtrip() -> None:
    items = [b"", b"abc", "é".encode()]
    assert decode_bytes_tensor(encode_bytes_tensor(items)) == items


def test_tritonclient_infer_and_stream(mock_server: Any, tokenizer: Any) -> None:
    prompt = "The quick brown fox"
    _, want = offline_generate(make_engine(tokenizer=tokenizer), tokenizer.encode(prompt),
                               SamplingParams(max_tokens=10, temperature=0.0))
    client = triton.InferenceServerClient(mock_server.target)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mock")
    meta = client.get_model_metadata("mock")
    assert meta.inputs[0].name == "text_input" and meta.outputs[0].name == "text_output"
    assert client.get_server_metadata().name == "xlaserve"

    # tritonclient 2.41 cannot send floats: the server parses numeric strings.
    params = {"max_tokens": 10, "temperature": "0", "top_p": "1.0", "top_k": 0, "seed": 3,
              "stop": '["never-appears"]'}
    result = client.infer("mock", [_text_input(prompt)], parameters=params)
    assert result.as_numpy("text_output")[0].decode() == want

    responses: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer("mock", [_text_input(prompt)], request_id="s1",
                                  parameters={"max_tokens": 10, "temperature": "0"})
        pieces, final = [], False
        while not final:
            result, error = responses.get(timeout=30)
            assert error is None, error
            resp = result.get_response()
            assert resp.id == "s1"
            pieces.append(result.as_numpy("text_output")[0].decode())
            final = resp.parameters["triton_final_response"].bool_param
        assert "".join(pieces) == want and len(pieces) > 1
        # A bad request on the stream comes back as an error message; the stream stays usable.
        client.async_stream_infer("mock", [_text_input(prompt)], request_id="bad",
                                  parameters={"temperature": "-1"})
        result, error = responses.get(timeout=30)
        assert result is None and "INVALID_ARGUMENT" in str(error) and "temperature" in str(error)
        client.async_stream_infer("mock", [_text_input(prompt)], request_id="s2",
                                  parameters={"max_tokens": 10, "temperature": "0",
                                              "stream": False})
        result, error = responses.get(timeout=30)
        assert error is None
        assert result.as_numpy("text_output")[0].decode() == want
        assert result.get_response().parameters["triton_final_response"].bool_param
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("params,field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": "2.0"}, "top_p"),
    ({"temperature": "-1"}, "temperature"),
    ({"temperature": "warm"}, "temperature"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"stop_token_ids": '["a"]'}, "stop_token_ids"),
    ({"stop_token_ids": "[1.5]"}, "stop_token_ids"),
    ({"top_k": 2**40}, "top_k"),
    ({"logit_bias": '{"x": 1}'}, "logit_bias"),
    ({"logit_bias": '{"5": 200}'}, "logit_bias"),
    ({"logit_bias": "[5]"}, "logit_bias"),
    ({"logit_bias": '{"5": 1, "05": 2}'}, "logit_bias"),
])
def test_tritonclient_invalid_parameters(mock_server: Any, params: dict[str, Any],
                                         field: str) -> None:
    client = triton.InferenceServerClient(mock_server.target)
    with pytest.raises(InferenceServerException) as info:
        client.infer("mock", [_text_input("hi")], parameters=params)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert field in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("other-model", [_text_input("hi")])
    assert "model_name" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("mock", [_text_input("")])
    assert "text_input" in info.value.message()
    client.close()


def test_stream_cancel_aborts_requests(start_server: Any) -> None:
    srv = start_server(step_delay_s=0.01)
    client = triton.InferenceServerClient(srv.target)
    got: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    for i in range(2):
        client.async_stream_infer("mock", [_text_input(f"long {i}")], request_id=f"c{i}",
                                  parameters={"max_tokens": 200})
    got.get(timeout=30)
    assert srv.server.bridge.num_in_flight == 2
    client.stop_stream(cancel_requests=True)
    client.close()
    import time

    deadline = time.monotonic() + 10
    while srv.server.metrics.value("xlaserve_kv_pages_used") or srv.server.bridge.num_in_flight:
        assert time.monotonic() < deadline, "stream cancel did not free the requests"
        time.sleep(0.01)
    assert srv.server.metrics.value("xlaserve_requests_total", {"finish_reason": "abort"}) == 2
