"""KServe v2 ``inference.GRPCInferenceService`` (with Triton's ModelStreamInfer) over the bridge.

A request carries one BYTES tensor ``text_input`` (in ``contents.bytes_contents`` or in
``raw_input_contents`` as 4-byte little-endian length + bytes, which is what tritonclient sends)
and its sampling as request parameters: every SamplingParams field by name, plus ``stream``
(ModelStreamInfer only; default true). Numbers may also be strings ("0.7": tritonclient before
2.44 cannot send floats). ``stop`` and ``stop_token_ids`` are a JSON list or, for ``stop``, one
string. Parameters starting with ``triton_`` are accepted and ignored. A request's ``id`` is
only echoed back, as in Triton: it need not be unique (the server tracks each request under an id
of its own, so the native Abort RPC cannot name a KServe request). Replies
carry a BYTES tensor ``text_output``; every streamed response has the bool parameter
``triton_final_response``, true on the last one, as Triton's decoupled models do.

Not supported: batches of more than one prompt, tensor inputs other than text_input,
repository, shared-memory, statistics and trace RPCs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from xlaserve.runtime.request import logit_bias_from_json
from xlaserve.serve.bridge import EngineBridge, NotAcceptingError
from xlaserve.serve.common import (
    InvalidArgument,
    RequestFailed,
    check_model,
    check_prompt,
    check_sampling,
    check_size,
    encode_text,
    make_sampling,
    status_for,
)
from xlaserve.serve.proto.messages import Undecodable, protos

import xlaserve

log = logging.getLogger(__name__)

INPUT_NAME = "text_input"
OUTPUT_NAME = "text_output"
FINAL_PARAM = "triton_final_response"
_DONE = object()  # one request of a stream ended
_READ_DONE = object()  # the client half-closed the stream


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """Elements of a serialized BYTES tensor (each: uint32 little-endian length, then bytes)."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidArgument(f"raw_input_contents: truncated length prefix at byte {pos}")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise InvalidArgument(f"raw_input_contents: element of {size} bytes overruns the "
                                  "tensor")
        out.append(raw[pos:pos + size])
        pos += size
    return out


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _param_value(name: str, p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    if which is None:
        raise InvalidArgument(f"parameters[{name!r}]: no value set")
    return getattr(p, which)


def sampling_from_parameters(params: Any) -> tuple[dict[str, Any], bool | None]:
    """(SamplingParams kwargs, stream flag or None) from a request's parameters map."""
    values: dict[str, Any] = {}
    stream = None
    for name in sorted(params):
        if name.startswith("triton_"):
            continue
        value = _param_value(name, params[name])
        if name == "stream":
            if not isinstance(value, bool):
                raise InvalidArgument(f"stream={value!r}: must be a bool parameter")
            stream = value
            continue
        if name not in _FIELD_KINDS:
            raise InvalidArgument(f"{name}: unknown request parameter")
        values[name] = _coerce(name, value)
    return values, stream


def _coerce(name: str, value: Any) -> Any:
    """Parameter value -> SamplingParams field value. Strings are parsed, since tritonclient
    before 2.44 cannot send float parameters (send "0.7")."""
    kind = _FIELD_KINDS[name]
    if kind == "logit_bias":  # a JSON object {"token id": bias}, as OpenAI's
        try:
            return logit_bias_from_json(json.loads(value) if isinstance(value, str) else None)
        except (json.JSONDecodeError, ValueError) as e:
            raise InvalidArgument(f"{name}: must be a JSON object of token id -> bias ({e})"
                                  ) from e
    if kind in ("stop", "stop_token_ids"):
        if not isinstance(value, str):
            raise InvalidArgument(f"{name}={value!r}: must be a string")
        if not value.startswith("["):
            if kind == "stop_token_ids":
                raise InvalidArgument(f"{name}={value!r}: must be a JSON list of ints")
            return (value,)
        try:
            return tuple(json.loads(value))
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{name}={value!r}: not a JSON list ({e})") from e
    if not isinstance(value, str):
        return float(value) if kind == "float" and not isinstance(value, bool) else value
    try:
        if kind == "bool":
            if value.lower() not in ("true", "false"):
                raise ValueError(value)
            return value.lower() == "true"
        return int(value) if kind == "int" else float(value)
    except ValueError as e:
        raise InvalidArgument(f"{name}={value!r}: not a valid {kind}") from e


_FIELD_KINDS = {
    **{name: "int" for name in ("max_tokens", "min_tokens", "top_k", "seed", "logprobs", "n")},
    **{name: "float" for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                                  "presence_penalty", "frequency_penalty")},
    "ignore_eos": "bool", "include_stop_str_in_output": "bool", "stop": "stop",
    "stop_token_ids": "stop_token_ids", "logit_bias": "logit_bias",
}


class KServeServicer:
    """Implements ``inference.GRPCInferenceService`` for one served model."""

    def __init__(self, bridge: EngineBridge, model_name: str, max_request_bytes: int) -> None:
        self.bridge = bridge
        self.model_name = model_name
        self.max_request_bytes = max_request_bytes
        self.pb = protos().kserve

    # ---- health and metadata ----------------------------------------------------------------

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return self.pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return self.pb.ServerReadyResponse(ready=self._ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await self._check_model(request.name, context)
        return self.pb.ModelReadyResponse(ready=self._ready())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return self.pb.ServerMetadataResponse(name="xlaserve", version=xlaserve.__version__)

    async def ModelMetadata(self, request: Any,
                            context: grpc.aio.ServicerContext) -> Any:
        await self._check_model(request.name, context)
        resp = self.pb.ModelMetadataResponse(name=self.model_name, versions=["1"],
                                             platform="xlaserve")
        resp.inputs.add(name=INPUT_NAME, datatype="BYTES", shape=[1])
        resp.outputs.add(name=OUTPUT_NAME, datatype="BYTES", shape=[1])
        return resp

    def _ready(self) -> bool:
        return self.bridge.ready.is_set() and not self.bridge.draining

    async def _check_model(self, name: str, context: grpc.aio.ServicerContext) -> None:
        try:
            check_model("name", name, self.model_name)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    # ---- inference --------------------------------------------------------------------------

    def _admit(self, request: Any, default_stream: bool) -> tuple[Any, bool]:
        """Validates a ModelInferRequest and submits it; returns (handle, stream)."""
        if isinstance(request, Undecodable):
            raise InvalidArgument(str(request))
        if not self.bridge.ready.is_set():
            raise NotAcceptingError("the model is not loaded yet")
        engine = self.bridge.engine
        check_size("ModelInferRequest", request.ByteSize(), self.max_request_bytes)
        check_model("model_name", request.model_name, self.model_name)
        if request.model_version not in ("", "1"):
            raise InvalidArgument(f"model_version={request.model_version!r}: only '1' exists")
        values, stream = sampling_from_parameters(request.parameters)
        sampling = make_sampling(values)
        check_sampling(engine, sampling)
        if sampling.n != 1:
            raise InvalidArgument(f"n={sampling.n}: the KServe API returns one sample; use "
                                  "xlaserve.v1 for n > 1")
        names = [t.name for t in request.inputs]
        if names != [INPUT_NAME]:
            raise InvalidArgument(f"inputs={names!r}: expected exactly one BYTES tensor "
                                  f"{INPUT_NAME!r}")
        tensor = request.inputs[0]
        if tensor.datatype != "BYTES":
            raise InvalidArgument(f"inputs[{INPUT_NAME!r}].datatype={tensor.datatype!r}: "
                                  "must be BYTES")
        if request.raw_input_contents:
            items = decode_bytes_tensor(request.raw_input_contents[0])
        else:
            items = list(tensor.contents.bytes_contents)
        if len(items) != 1:
            raise InvalidArgument(f"inputs[{INPUT_NAME!r}]: {len(items)} elements; send one "
                                  "prompt per request")
        try:
            text = items[0].decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"inputs[{INPUT_NAME!r}]: not UTF-8 ({e})") from e
        prompt = check_prompt(engine, INPUT_NAME, encode_text(engine, INPUT_NAME, text),
                              sampling.max_tokens)
        handle = self.bridge.submit(f"kserve-{uuid.uuid4().hex}", prompt, sampling)
        return handle, default_stream if stream is None else stream

    def _response(self, request: Any, text: str, final: bool | None,
                  out: Any) -> Any:
        resp = self.pb.ModelInferResponse(model_name=self.model_name, model_version="1",
                                          id=request.id)
        resp.outputs.add(name=OUTPUT_NAME, datatype="BYTES", shape=[1])
        resp.raw_output_contents.append(encode_bytes_tensor([text.encode("utf-8")]))
        if final is not None:
            resp.parameters[FINAL_PARAM].bool_param = final
        if out is not None and out.finished:
            resp.parameters["finish_reason"].string_param = out.finish_reason or ""
            resp.parameters["completion_tokens"].int64_param = out.num_output_tokens
            resp.parameters["prompt_tokens"].int64_param = out.num_prompt_tokens
        return resp

    async def _responses(self, request: Any, handle: Any,
                         stream: bool) -> AsyncIterator[Any]:
        """Responses for one admitted request; raises RequestFailed when it failed."""
        pieces: list[str] = []
        try:
            async for event in handle:
                out = event.output
                if out.error:
                    raise RequestFailed(f"request failed: {out.error}", event.status or "INTERNAL")
                if stream:
                    yield self._response(request, out.new_text, out.finished, out)
                else:
                    pieces.append(out.new_text)
                    if out.finished:
                        yield self._response(request, "".join(pieces), True, out)
        finally:
            handle.close()

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            handle, _ = self._admit(request, default_stream=False)
        except Exception as e:  # every admission error becomes a status
            await context.abort(status_for(e), str(e))
            raise
        result = None
        try:
            async for resp in self._responses(request, handle, stream=False):
                result = resp
        except RequestFailed as e:
            await context.abort(status_for(e), str(e))
        if result is None:  # the bridge always ends a request with a final event
            await context.abort(grpc.StatusCode.INTERNAL, "the request ended without a response")
        del result.parameters[FINAL_PARAM]
        return result

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """Serves every request of the stream concurrently; errors go in ``error_message``."""
        out: asyncio.Queue[Any] = asyncio.Queue()
        tasks: list[asyncio.Task[None]] = []

        async def serve_one(request: Any) -> None:
            try:
                handle, stream = self._admit(request, default_stream=True)
                async for resp in self._responses(request, handle, stream):
                    await out.put(self.pb.ModelStreamInferResponse(infer_response=resp))
            except Exception as e:  # noqa: BLE001 (fails this request only)
                code = status_for(e).name
                await out.put(self.pb.ModelStreamInferResponse(
                    error_message=f"{code}: {e}",
                    infer_response=self.pb.ModelInferResponse(id=getattr(request, "id", ""))))
            finally:
                await out.put(_DONE)

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    tasks.append(asyncio.create_task(serve_one(request)))
            except Exception:  # noqa: BLE001 (the reading side broke: answer what was read)
                log.exception("ModelStreamInfer: reading the request stream failed")
            finally:  # without it a failed read leaves the stream open forever
                out.put_nowait(_READ_DONE)

        reader = asyncio.create_task(read_all())
        done, reading = 0, True
        try:
            while reading or done < len(tasks):
                item = await out.get()
                if item is _READ_DONE:
                    reading = False
                    continue
                if item is _DONE:
                    done += 1
                    continue
                yield item
        finally:
            reader.cancel()
            for task in tasks:
                task.cancel()
