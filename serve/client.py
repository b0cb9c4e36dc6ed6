"""A small synchronous Python client for the native ``xlaserve.v1`` service.

    with XlaserveClient("127.0.0.1:50051") as c:
        print(c.generate("Once upon a time", max_tokens=32, temperature=0).text)
        for delta in c.generate_stream("Hello", max_tokens=8):
            print(delta.text, end="")

Errors surface as ``grpc.RpcError`` (``e.code()`` is e.g. INVALID_ARGUMENT). No retries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from xlaserve.serve.proto.messages import NATIVE_SERVICE, Stub, protos

FINISH_REASON_NAMES = {0: None, 1: "stop", 2: "length", 3: "abort"}


@dataclasses.dataclass(frozen=True)
class Completion:
    """One finished sample, accumulated from its responses."""

    request_id: str
    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    final: Any  # the GenerateFinal message (timings, matched stop)


def build_generate_request(prompt: str | None = None, *,
                           messages: Sequence[Mapping[str, str]] | None = None,
                           token_ids: Sequence[int] | None = None, request_id: str = "",
                           model: str = "", stream: bool = False, **sampling: Any) -> Any:
    """A GenerateRequest from exactly one input and SamplingParams fields by name.

    Raises:
      ValueError: not exactly one input, or an unknown sampling field.
    """
    pb = protos().native
    inputs = [x is not None for x in (prompt, messages, token_ids)]
    if sum(inputs) != 1:
        raise ValueError("prompt/messages/token_ids: give exactly one")
    req = pb.GenerateRequest(request_id=request_id, model=model, stream=stream)
    if prompt is not None:
        req.text = prompt
    elif messages is not None:
        req.chat.SetInParent()  # an empty list is still the chat input (the server says so)
        for m in messages:
            req.chat.messages.add(role=m["role"], content=m["content"])
    else:
        req.token_ids.SetInParent()
        req.token_ids.ids.extend(int(t) for t in token_ids or ())
    fields = req.sampling.DESCRIPTOR.fields_by_name
    for name, value in sampling.items():
        if name not in fields:
            raise ValueError(f"{name}={value!r}: unknown sampling field")
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):  # the repeated fields
            getattr(req.sampling, name).extend([value] if isinstance(value, str) else value)
        elif name == "logit_bias":  # the map field: {token id: bias}
            getattr(req.sampling, name).update({int(k): float(v) for k, v in dict(value).items()})
        else:
            setattr(req.sampling, name, value)
    return req


class XlaserveClient:
    """Blocking client over one channel. ``timeout_s`` bounds each call (None: no deadline)."""

    def __init__(self, target: str = "127.0.0.1:50051", *, timeout_s: float | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(target, options=list(options))
        self.stub = Stub(self.channel, NATIVE_SERVICE)
        self.pb = protos().native

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate_stream(self, prompt: str | None = None, **kwargs: Any) -> Iterator[Any]:
        """Streams GenerateResponse messages (deltas; the last of each sample has `final`).

        Breaking out of the loop cancels the call, which aborts the request on the server.
        """
        req = build_generate_request(prompt, stream=True, **kwargs)
        call = self.stub.Generate(req, timeout=self.timeout_s)
        try:
            yield from call
        finally:
            call.cancel()

    def generate(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """Generates and returns the first sample (see ``generate_all`` for n > 1)."""
        return self.generate_all(prompt, **kwargs)[0]

    def generate_all(self, prompt: str | None = None, *, stream: bool = False,
                     **kwargs: Any) -> list[Completion]:
        """Every sample of one request, ordered by index."""
        req = build_generate_request(prompt, stream=stream, **kwargs)
        texts: dict[int, list[str]] = {}
        ids: dict[int, list[int]] = {}
        done: dict[int, Completion] = {}
        for resp in self.stub.Generate(req, timeout=self.timeout_s):
            texts.setdefault(resp.index, []).append(resp.delta.text)
            ids.setdefault(resp.index, []).extend(resp.delta.token_ids)
            if resp.HasField("final"):
                f = resp.final
                done[resp.index] = Completion(
                    request_id=resp.request_id, index=resp.index,
                    text="".join(texts[resp.index]), token_ids=tuple(ids[resp.index]),
                    finish_reason=FINISH_REASON_NAMES.get(f.finish_reason),
                    prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens,
                    cached_tokens=f.cached_tokens, final=f)
        return [done[i] for i in sorted(done)]

    def abort(self, request_id: str) -> bool:
        resp = self.stub.Abort(self.pb.AbortRequest(request_id=request_id),
                               timeout=self.timeout_s)
        return bool(resp.found)

    def model_info(self) -> Any:
        return self.stub.GetModelInfo(self.pb.GetModelInfoRequest(), timeout=self.timeout_s)

    def tokenize(self, text: str) -> list[int]:
        resp = self.stub.Tokenize(self.pb.TokenizeRequest(text=text), timeout=self.timeout_s)
        return list(resp.token_ids)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        resp = self.stub.Detokenize(self.pb.DetokenizeRequest(token_ids=list(token_ids)),
                                    timeout=self.timeout_s)
        return str(resp.text)

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING, ..."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        request = health_pb2.HealthCheckRequest(service=service)
        check = stub.Check  # pyright: ignore[reportAttributeAccessIssue] (set in __init__)
        resp = check(request, timeout=self.timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
