"""Loads xlaserve's protos into a private descriptor pool and builds message classes from it.

Why not the usual ``*_pb2.py`` modules: (1) they register their messages in protobuf's process-wide
default pool, and tritonclient registers its own ``inference.*`` messages there, so importing both
in one process fails with duplicate symbols; (2) gencode pins the protobuf runtime to the protoc
version that made it (7.35 here) while this package must load on whatever protobuf 4.x-7.x the GPU
machine has. A serialized FileDescriptorSet (``descriptors.py``, made by ``regen.sh``) loaded into a
pool of our own has neither problem. Services are wired with grpc's generic handlers built from
the service descriptors (see ``service_handler`` and ``Stub``).

This module must not touch the default descriptor pool.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from xlaserve.serve.proto.descriptors import FILE_DESCRIPTOR_SET

NATIVE_SERVICE = "xlaserve.v1.XlaserveService"
KSERVE_SERVICE = "inference.GRPCInferenceService"


def _message_class(desc: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(desc)  # protobuf >= 4.22 (tested 4.25 to 7.36)


class ProtoSet:
    """A private pool with xlaserve.v1 and inference, plus health and reflection for reflection."""

    def __init__(self) -> None:
        self.pool = descriptor_pool.DescriptorPool()
        fds = descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET)
        for file_proto in fds.file:
            self.pool.AddSerializedFile(file_proto.SerializeToString())
        # grpcurl asks reflection about every listed service, so their files live here too.
        from grpc_health.v1 import health_pb2
        from grpc_reflection.v1alpha import reflection_pb2

        for mod in (health_pb2, reflection_pb2):
            self.pool.AddSerializedFile(mod.DESCRIPTOR.serialized_pb)
        self.native = self.namespace("xlaserve.v1")
        self.kserve = self.namespace("inference")

    def message(self, full_name: str) -> type[Message]:
        """The message class for a full name such as ``xlaserve.v1.GenerateRequest``."""
        return _message_class(self.pool.FindMessageTypeByName(full_name))

    def service(self, full_name: str) -> ServiceDescriptor:
        return self.pool.FindServiceByName(full_name)

    def namespace(self, package: str) -> types.SimpleNamespace:
        """Top-level messages and enum values of one proto package, by short name."""
        ns = types.SimpleNamespace()
        for name in ("xlaserve/v1/xlaserve.proto", "inference/grpc_service.proto"):
            fd = self.pool.FindFileByName(name)
            if fd.package != package:
                continue
            for short, desc in fd.message_types_by_name.items():
                setattr(ns, short, _message_class(desc))
            for enum in fd.enum_types_by_name.values():
                for value in enum.values:
                    setattr(ns, value.name, value.number)
        return ns


@functools.cache
def protos() -> ProtoSet:
    """The process's ProtoSet (built once: message classes must be the same objects everywhere)."""
    return ProtoSet()


_HANDLER_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class Undecodable:
    """Stands in for a request message whose bytes did not parse (e.g. a string field holding
    bad UTF-8). A deserializer that raised would make grpc answer UNKNOWN (and, inside a
    request stream, break the stream): this way the handler answers INVALID_ARGUMENT instead.
    ``str()`` is the message for the client."""

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error

    def __str__(self) -> str:
        return f"{self.type_name}: the request does not parse ({self.error})"


def _lenient_parser(cls: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            return Undecodable(cls.DESCRIPTOR.full_name, str(e))
    return parse


def _refuse_undecodable(fn: Callable[..., Any], server_streaming: bool) -> Callable[..., Any]:
    """Wraps a unary-request method: an Undecodable request gets INVALID_ARGUMENT."""
    if server_streaming:
        async def stream_method(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
            responses = fn(request, context)
            try:
                async for response in responses:
                    yield response
            finally:  # now, not at garbage collection: its `finally` frees the request
                await responses.aclose()
        return stream_method

    async def unary_method(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
        return await fn(request, context)
    return unary_method


def service_handler(service_name: str, servicer: Any) -> grpc.GenericRpcHandler:
    """A generic handler that routes each method of `service_name` to ``servicer.<Method>``.

    A request that does not parse reaches a unary-request method as INVALID_ARGUMENT; a
    request-streaming method gets it as an `Undecodable` item of its request stream.

    Raises:
      ValueError: the servicer lacks a method of the service.
    """
    ps = protos()
    handlers = {}
    for method in ps.service(service_name).methods:
        fn = getattr(servicer, method.name, None)
        if fn is None:
            raise ValueError(f"servicer={type(servicer).__name__}: lacks method {method.name}")
        factory = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        if not method.client_streaming:
            fn = _refuse_undecodable(fn, method.server_streaming)
        handlers[method.name] = factory(
            fn,
            request_deserializer=_lenient_parser(_message_class(method.input_type)),
            response_serializer=_message_class(method.output_type).SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service_name, handlers)


class Stub:
    """Client stub for one service over a grpc (or grpc.aio) channel: ``stub.Generate(req)``."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel, service_name: str) -> None:
        for method in protos().service(service_name).methods:
            kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                    (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
                (method.client_streaming, method.server_streaming)]
            setattr(self, method.name, kind(
                f"/{service_name}/{method.name}",
                request_serializer=_message_class(method.input_type).SerializeToString,
                response_deserializer=_message_class(method.output_type).FromString,
            ))

    def __getattr__(self, name: str) -> Any:  # methods are set per instance; keeps pyright calm
        raise AttributeError(name)
