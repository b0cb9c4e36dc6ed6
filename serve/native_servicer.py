"""The native ``xlaserve.v1.XlaserveService``: translates between its protos and the bridge.

Generate validates everything (model, input, sampling, size, context length) before the request
reaches the engine; a cancelled or expired call closes its handle, which aborts the request.
No generation logic lives here.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from xlaserve.runtime.request import RequestOutput
from xlaserve.serve.bridge import EngineBridge, StreamEvent
from xlaserve.serve.common import (
    SAMPLING_FIELDS,
    InvalidArgument,
    check_model,
    check_prompt,
    check_sampling,
    check_size,
    encode_chat,
    encode_text,
    make_sampling,
    status_for,
    tokenizer_of,
)
from xlaserve.serve.proto.messages import protos

_FINISH_REASONS = {"stop": "FINISH_REASON_STOP", "length": "FINISH_REASON_LENGTH",
                   "abort": "FINISH_REASON_ABORT"}


def sampling_values(msg: Any) -> dict[str, Any]:
    """SamplingParams keyword arguments from a ``xlaserve.v1.SamplingParams`` (set fields only)."""
    values: dict[str, Any] = {}
    for name in SAMPLING_FIELDS:
        value = getattr(msg, name)
        if name in ("stop", "stop_token_ids"):  # repeated
            if len(value):
                values[name] = tuple(value)
        elif name == "logit_bias":  # map
            if len(value):
                values[name] = dict(value)
        elif name in ("ignore_eos", "include_stop_str_in_output"):  # plain bools (false is
            if value:  # the default anyway)
                values[name] = True
        elif msg.HasField(name):  # every other field is proto3 `optional`
            values[name] = value
    return values


class NativeServicer:
    """Implements every method of ``xlaserve.v1.XlaserveService`` over an EngineBridge.

    Args:
      bridge: the running engine bridge.
      model_name: the served model's name (requests may name it or leave it empty).
      max_request_bytes: larger requests get INVALID_ARGUMENT naming the message.
    """

    def __init__(self, bridge: EngineBridge, model_name: str, max_request_bytes: int) -> None:
        self.bridge = bridge
        self.model_name = model_name
        self.max_request_bytes = max_request_bytes
        self.pb = protos().native

    async def _engine(self, context: grpc.aio.ServicerContext) -> Any:
        if not self.bridge.ready.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is not loaded yet")
        return self.bridge.engine

    def _prompt(self, engine: Any, request: Any, max_tokens: int) -> list[int]:
        which = request.WhichOneof("input")
        if which is None:
            raise InvalidArgument("input: set one of text, chat or token_ids")
        if which == "text":
            ids = encode_text(engine, "text", request.text)
        elif which == "chat":
            msgs = [{"role": m.role, "content": m.content} for m in request.chat.messages]
            ids = encode_chat(engine, "chat", msgs)
        else:
            ids = list(request.token_ids.ids)
        return check_prompt(engine, which, ids, max_tokens)

    async def Generate(self, request: Any,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        engine = await self._engine(context)
        request_id = request.request_id or uuid.uuid4().hex
        try:
            check_size("GenerateRequest", request.ByteSize(), self.max_request_bytes)
            check_model("model", request.model, self.model_name)
            sampling = make_sampling(sampling_values(request.sampling))
            check_sampling(engine, sampling)
            prompt = self._prompt(engine, request, sampling.max_tokens)
            handle = self.bridge.submit(request_id, prompt, sampling)
        except Exception as e:  # every admission error becomes a status
            await context.abort(status_for(e), str(e))
            raise  # unreachable: abort raises
        try:
            if request.stream:
                async for event in handle:
                    await self._check_error(event, context)
                    yield self._response(request_id, event, event.output.new_token_ids,
                                         event.output.new_text, event.output.new_logprobs)
            else:
                acc: dict[int, tuple[list[int], list[str], list[Any]]] = {}
                async for event in handle:
                    await self._check_error(event, context)
                    ids, texts, lps = acc.setdefault(event.index, ([], [], []))
                    ids.extend(event.output.new_token_ids)
                    texts.append(event.output.new_text)
                    lps.extend(event.output.new_logprobs)
                    if event.output.finished:
                        yield self._response(request_id, event, ids, "".join(texts), lps)
        finally:
            handle.close()

    @staticmethod
    async def _check_error(event: StreamEvent, context: grpc.aio.ServicerContext) -> None:
        if event.output.error:
            code = grpc.StatusCode[event.status or "INTERNAL"]
            await context.abort(code, f"request failed: {event.output.error}")

    def _response(self, request_id: str, event: StreamEvent, token_ids: Any, text: str,
                  logprobs: Any) -> Any:
        pb = self.pb
        resp = pb.GenerateResponse(request_id=request_id, index=event.index)
        resp.delta.token_ids.extend(token_ids)
        resp.delta.text = text
        for lp in logprobs:
            item = resp.delta.logprobs.add(token_id=lp.token_id, logprob=lp.logprob)
            for tid, value in lp.top:
                item.top.add(token_id=tid, logprob=value)
        if event.output.finished:
            self._fill_final(resp.final, event.output, event)
        return resp

    def _fill_final(self, final: Any, out: RequestOutput, event: StreamEvent) -> None:
        final.finish_reason = getattr(self.pb, _FINISH_REASONS.get(out.finish_reason or "",
                                                                   "FINISH_REASON_UNSPECIFIED"))
        if isinstance(out.stop_reason, str):
            final.stop_string = out.stop_reason
        elif isinstance(out.stop_reason, int):
            final.stop_token_id = out.stop_reason
        final.prompt_tokens = out.num_prompt_tokens
        final.completion_tokens = out.num_output_tokens
        final.cached_tokens = out.num_cached_tokens
        if out.error:
            final.error = out.error
        if event.timings is not None:
            t = event.timings
            final.timings.queue_s = t.queue_s
            final.timings.time_to_first_token_s = t.time_to_first_token_s
            final.timings.end_to_end_s = t.end_to_end_s
            final.timings.mean_inter_token_s = t.mean_inter_token_s

    async def Abort(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id='': must be set")
        return self.pb.AbortResponse(found=self.bridge.abort(request.request_id))

    async def GetModelInfo(self, request: Any,
                           context: grpc.aio.ServicerContext) -> Any:
        engine = await self._engine(context)
        cfg, mc = engine.config, engine.model_config
        return self.pb.GetModelInfoResponse(
            model=self.model_name, model_type=mc.model_type,
            context_length=cfg.scheduler.max_model_len, vocab_size=mc.vocab_size,
            token_buckets=list(engine.runner.token_buckets),
            seq_buckets=list(engine.runner.seq_buckets),
            tensor_parallel_size=cfg.parallel.tensor_parallel_size,
            data_parallel_size=cfg.parallel.data_parallel_size,
            page_size=cfg.cache.page_size, num_pages=int(engine.stats().num_pages_total),
            max_num_seqs=cfg.scheduler.max_num_seqs, dtype=cfg.dtype)

    async def Tokenize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        engine = await self._engine(context)
        try:
            check_size("TokenizeRequest", request.ByteSize(), self.max_request_bytes)
            check_model("model", request.model, self.model_name)
            which = request.WhichOneof("input")
            if which == "text":
                ids = encode_text(engine, "text", request.text)
            elif which == "chat":
                ids = encode_chat(engine, "chat", [{"role": m.role, "content": m.content}
                                                   for m in request.chat.messages])
            else:
                raise InvalidArgument("input: set one of text or chat")
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise
        return self.pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        engine = await self._engine(context)
        try:
            check_size("DetokenizeRequest", request.ByteSize(), self.max_request_bytes)
            check_model("model", request.model, self.model_name)
            tokenizer = tokenizer_of(engine, "token_ids")
            vocab = engine.model_config.vocab_size
            bad = next((t for t in request.token_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidArgument(f"token_ids: {bad} is outside the vocabulary [0, {vocab})")
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            raise
        return self.pb.DetokenizeResponse(text=tokenizer.decode(list(request.token_ids)))
