"""Host-side request records: SamplingParams, Request, RequestStatus, RequestOutput.

Plain Python only. This module must never import jax (a test asserts it): the scheduler, the page
allocator and the server all use it on the host.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import operator
import time
from collections.abc import Iterable, Mapping


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples its tokens. Validated on construction.

    A bad value raises ValueError naming the field and the value, e.g. ``temperature=-1.0``.
    """

    max_tokens: int = 16  # most tokens to generate
    min_tokens: int = 0  # EOS, stop token ids and stop strings are ignored until this many tokens
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off (-1 too, vLLM's and SGLang's spelling; stored as 0)
    top_p: float = 1.0  # nucleus; 1.0 = off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max; 0 = off
    repetition_penalty: float = 1.0  # HF-style multiplicative penalty on seen tokens; 1 = off
    presence_penalty: float = 0.0  # OpenAI-style additive penalty on generated tokens
    frequency_penalty: float = 0.0  # OpenAI-style, scaled by count of generated occurrences
    seed: int | None = None  # per-request seed: reproducible whatever else is batched
    stop: tuple[str, ...] = ()  # stop strings; the output is trimmed before the match
    stop_token_ids: tuple[int, ...] = ()  # extra token ids that end the request
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per token (0: only sampled)
    n: int = 1  # samples per prompt, sharing the prompt's pages
    include_stop_str_in_output: bool = False  # keep a matched stop string at the end of the text
    # Added to the logits of these token ids before penalties and sampling (OpenAI's logit_bias;
    # -100 bans a token, +100 forces it). A mapping {token id: bias} becomes sorted pairs.
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            try:
                object.__setattr__(self, "stop", tuple(self.stop))
            except TypeError:
                raise ValueError(f"stop={self.stop!r}: must be a string or a list of strings"
                                 ) from None
        object.__setattr__(self, "stop_token_ids", _token_ids(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        # The step's arrays are int32: a larger value would fail the whole batch mid-step.
        checks = [
            ("max_tokens", _is_int(self.max_tokens) and 1 <= self.max_tokens <= _INT32_MAX,
             "must be an integer in [1, 2**31)"),
            ("min_tokens", _is_int(self.min_tokens) and 0 <= self.min_tokens,
             "must be an integer >= 0"),
            ("min_tokens", not (_is_int(self.min_tokens) and _is_int(self.max_tokens))
             or self.min_tokens <= self.max_tokens, "must be <= max_tokens"),
            ("temperature", _finite(self.temperature) and self.temperature >= 0, "must be >= 0"),
            ("top_k", _is_int(self.top_k) and 0 <= self.top_k <= _INT32_MAX,
             "must be in [0, 2**31) (0 or -1 = off)"),
            ("top_p", _finite(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", _finite(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", _finite(self.repetition_penalty) and
             self.repetition_penalty > 0, "must be > 0"),
            ("presence_penalty", _finite(self.presence_penalty) and
             -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", _finite(self.frequency_penalty) and
             -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("seed", self.seed is None or _is_int(self.seed), "must be an integer"),
            ("logprobs", self.logprobs is None or (_is_int(self.logprobs) and
                                                   0 <= self.logprobs <= 20), "must be in [0, 20]"),
            ("n", _is_int(self.n) and 1 <= self.n <= 64, "must be in [1, 64]"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "must be true or false"),
            ("include_stop_str_in_output", isinstance(self.include_stop_str_in_output, bool),
             "must be true or false"),
            ("stop", all(isinstance(s, str) and s for s in self.stop),
             "must be non-empty strings"),
        ]
        for field, ok, why in checks:
            if not ok:
                raise ValueError(f"{field}={getattr(self, field)!r}: {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


_INT32_MAX = 2**31 - 1


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_ids(values: object) -> tuple[int, ...]:
    """stop_token_ids as Python ints in [0, 2**31) (numpy ints too; not bools, floats, strings)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ValueError(f"stop_token_ids={_brief(values)}: must be a list of token ids")
    vals = tuple(values)
    try:
        ids = tuple(operator.index(t) for t in vals)
    except TypeError:
        ids = None
    if (ids is None or any(isinstance(t, bool) for t in vals)
            or not all(0 <= t <= _INT32_MAX for t in ids)):
        raise ValueError(f"stop_token_ids={list(vals)!r}: must be token ids in [0, 2**31)")
    return ids


MAX_LOGIT_BIAS = 300  # entries per request (OpenAI's limit); the step's bias arrays are this wide


def _brief(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs: ids in [0, 2**31), biases in [-100, 100].

    None is no bias (vLLM's default). Errors quote the value briefly (a gRPC status message
    must stay small).
    """
    if value is None:
        return ()
    try:
        if isinstance(value, Mapping):
            items = list(value.items())
        elif isinstance(value, Iterable):
            items = [tuple(p) for p in value]
        else:
            items = None
    except TypeError:
        items = None
    if items is None or any(len(p) != 2 for p in items):
        raise ValueError(f"logit_bias={_brief(value)}: must map token ids to biases")
    if len(items) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias: {len(items)} entries; at most {MAX_LOGIT_BIAS}")
    pairs = []
    for tok, bias in items:
        try:
            tok_id = None if isinstance(tok, bool) else operator.index(tok)
        except TypeError:
            tok_id = None
        if tok_id is None or not 0 <= tok_id <= _INT32_MAX:
            raise ValueError(f"logit_bias: token id {_brief(tok)} must be an integer in "
                             f"[0, 2**31)")
        # Outside [-100, 100] written with < and <= only: numbers.Real declares no > or >=.
        if (isinstance(bias, bool) or not isinstance(bias, numbers.Real)
                or not math.isfinite(bias) or bias < -100 or not bias <= 100):
            raise ValueError(f"logit_bias: bias {_brief(bias)} for token {tok_id} must be a "
                             f"number in [-100, 100]")
        pairs.append((tok_id, float(bias)))
    if len({t for t, _ in pairs}) != len(pairs):
        raise ValueError("logit_bias: a token id appears twice")
    return tuple(sorted(pairs))


def logit_bias_from_json(obj: object) -> dict[int, object]:
    """OpenAI's JSON logit_bias: an object whose keys are token ids in decimal ("50256").

    Raises:
      ValueError naming logit_bias: not an object, a key that is not ASCII digits, or two keys
        of one id ("5" and "05").
    """
    if not isinstance(obj, dict):
        raise ValueError(f"logit_bias={_brief(obj)}: must be an object of token id -> bias")
    out: dict[int, object] = {}
    for key, bias in obj.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ValueError(f"logit_bias: key {_brief(key)} is not a token id")
        tok = int(key)
        if tok in out:
            raise ValueError(f"logit_bias: token id {tok} appears twice ({key!r})")
        out[tok] = bias
    return out


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len reached
    FINISHED_ABORTED = "abort"  # aborted by the client or by an error

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclasses.dataclass
class Request:
    """One sequence being generated. Mutated by the scheduler only.

    For n > 1 the engine adds n Requests whose ids are ``f"{parent}#{i}"``; they share the prompt's
    pages through the prefix cache.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    page_ids: list[int] = dataclasses.field(default_factory=list)
    eos_token_ids: tuple[int, ...] = ()
    stop_reason: str | int | None = None  # matched stop string or token id
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of the sampled token and the top-n alternatives at one position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), best first


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: the delta since the last output."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str  # detokenized delta, with stop strings held back / trimmed
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: str | int | None = None
    new_logprobs: tuple[TokenLogprobs, ...] = ()
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None  # set when the request failed (finish_reason "abort")
