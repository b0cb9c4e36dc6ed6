"""Input checks and error mapping shared by the native and KServe servicers.

Every check raises ``InvalidArgument`` whose message names the field and the value, before the
request reaches the engine. ``status_for`` maps the bridge's errors to gRPC status codes.
This module never touches the engine loop: it only reads the tokenizer and configs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from xlaserve.runtime.request import SamplingParams
from xlaserve.serve.bridge import DuplicateRequestError, NotAcceptingError, QueueFullError

SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


class InvalidArgument(ValueError):
    """Bad client input; answered with INVALID_ARGUMENT and this message."""


class RequestFailed(Exception):
    """The engine failed an admitted request; `status` names the gRPC status to answer with."""

    def __init__(self, message: str, status: str) -> None:
        super().__init__(message)
        self.status = status


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an error raised while admitting or running a request."""
    if isinstance(exc, RequestFailed):
        return grpc.StatusCode[exc.status]
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, NotAcceptingError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, (InvalidArgument, DuplicateRequestError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def make_sampling(values: Mapping[str, Any]) -> SamplingParams:
    """SamplingParams from field values; SamplingParams' own ValueError names a bad field
    (it also bounds the int fields to int32 and takes top_k=-1 as off)."""
    unknown = sorted(set(values) - set(SAMPLING_FIELDS))
    if unknown:
        raise InvalidArgument(f"{unknown[0]}: unknown sampling parameter")
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"sampling.{e}") from e


def check_sampling(engine: Any, sampling: SamplingParams) -> None:
    """Checks what SamplingParams cannot see alone: stop strings need a tokenizer."""
    if sampling.stop and engine.tokenizer is None:
        raise InvalidArgument(f"stop={list(sampling.stop)!r}: this model has no tokenizer, so "
                              "stop strings cannot match; use stop_token_ids")


def tokenizer_of(engine: Any, field: str) -> Any:
    """The engine's tokenizer; a model served without one takes token ids only."""
    if engine.tokenizer is None:
        raise InvalidArgument(f"{field}: this model has no tokenizer (its directory has no "
                              "tokenizer.json); send token ids")
    return engine.tokenizer


def check_model(field: str, value: str, served_model: str) -> None:
    """Empty means the served model; anything else must equal its name."""
    if value and value != served_model:
        raise InvalidArgument(f"{field}={value!r}: unknown model (this server serves "
                              f"{served_model!r})")


def check_size(field: str, num_bytes: int, limit: int) -> None:
    if num_bytes > limit:
        raise InvalidArgument(f"{field}: {num_bytes} bytes is more than the {limit}-byte limit")


def encode_text(engine: Any, field: str, text: str) -> list[int]:
    """Token ids of a text prompt (with the tokenizer's special tokens, e.g. BOS)."""
    if not text:
        raise InvalidArgument(f"{field}='': the prompt is empty")
    return list(tokenizer_of(engine, field).encode(text))


def encode_chat(engine: Any, field: str, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template."""
    if not messages:
        raise InvalidArgument(f"{field}: no messages")
    for i, m in enumerate(messages):
        if not m.get("role"):
            raise InvalidArgument(f"{field}.messages[{i}].role='': must be set")
    tokenizer = tokenizer_of(engine, field)
    try:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    except ValueError as e:
        raise InvalidArgument(f"{field}: {e}") from e
    # The template writes BOS itself where the model wants one.
    return list(tokenizer.encode(text, add_special_tokens=False))


def check_prompt(engine: Any, field: str, token_ids: Sequence[int],
                 max_tokens: int) -> list[int]:
    """Checks the prompt plus `max_tokens` fits the context and the ids are in the vocabulary."""
    ids = [int(t) for t in token_ids]
    if not ids:
        raise InvalidArgument(f"{field}: the prompt is empty")
    context = engine.config.scheduler.max_model_len
    if len(ids) >= context:
        raise InvalidArgument(f"{field}: the prompt has {len(ids)} tokens; the context length is "
                              f"{context} (prompt + at least one generated token)")
    if len(ids) + max_tokens > context:
        raise InvalidArgument(f"max_tokens={max_tokens}: the prompt has {len(ids)} tokens and "
                              f"the context length is {context}; ask for at most "
                              f"{context - len(ids)}")
    vocab = engine.model_config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidArgument(f"{field}: token id {bad} is outside the vocabulary [0, {vocab})")
    return ids
