"""Turns the scheduler's token deltas into text deltas: incremental detokenization and stop strings.

Stop strings: text that could still be the start of a stop string is held back (not streamed)
until it either completes the stop (the request finishes and the text is trimmed just before the
match; the stop string itself is not returned) or can no longer match (it is released). Held text
is flushed when the request finishes for any other reason. Like EOS and stop token ids, stop
strings count only once the request has more than min_tokens output tokens.

Also here: `Completion`, the finished result of one sequence, accumulated from its deltas (what the
offline API and the batch CLI return).

Host only; never imports jax.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from xlaserve.runtime.request import RequestOutput, SamplingParams, TokenLogprobs


class Detokenizer(Protocol):
    def add(self, new_token_ids: Sequence[int]) -> str: ...

    def flush(self) -> str: ...


DetokenizerFactory = Callable[[Sequence[int]], Detokenizer]  # prompt ids -> detokenizer


def default_detokenizer_factory(tokenizer: Any) -> DetokenizerFactory:
    """The IncrementalDetokenizer of checkpoints/tokenizer.py, skipping special tokens."""
    from xlaserve.checkpoints.tokenizer import IncrementalDetokenizer

    return lambda prompt: IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)


def find_stop(text: str, start: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """Earliest stop string occurring in text[start:]: (index, stop), or None."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def held_back(text: str, start: int, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of some stop string."""
    tail = text[start:]
    for k in range(min(len(tail), max(len(s) for s in stops) - 1), 0, -1):
        suffix = tail[-k:]
        if any(s.startswith(suffix) for s in stops):
            return k
    return 0


class _State:
    def __init__(self, detok: Detokenizer | None, stops: tuple[str, ...], min_tokens: int = 0,
                 include_stop: bool = False):
        self.detok = detok
        self.stops = stops
        self.include_stop = include_stop  # a matched stop string stays in the text (vLLM's flag)
        self.min_tokens = min_tokens  # stop strings count only after this many output tokens
        self.num_tokens = 0  # output tokens seen
        self.text = ""  # everything decoded so far (includes held text)
        self.sent = 0  # chars of `text` already returned


class OutputProcessor:
    """Per-request detokenizers and stop-string state.

    Args:
      detokenizer_factory: prompt ids -> a detokenizer with add(ids) -> str and flush() -> str;
        None: no text at all (token ids only; stop strings then never match).
    """

    def __init__(self, detokenizer_factory: DetokenizerFactory | None):
        self._factory = detokenizer_factory
        self._states: dict[str, _State] = {}

    def add(self, request_id: str, prompt_token_ids: Sequence[int],
            sampling: SamplingParams) -> None:
        detok = self._factory(prompt_token_ids) if self._factory is not None else None
        self._states[request_id] = _State(detok, sampling.stop, sampling.min_tokens,
                                          sampling.include_stop_str_in_output)

    def remove(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def process(self, out: RequestOutput) -> tuple[RequestOutput, str | None]:
        """Fills `new_text` of a scheduler delta.

        Returns:
          (the output to emit, the stop string matched or None). When a stop string matched, the
          returned output is final with finish_reason "stop" and the caller must end the request
          in the scheduler (the scheduler did not see the text).
        """
        st = self._states.get(out.request_id)
        if st is None:
            return out, None
        st.num_tokens += len(out.new_token_ids)
        if st.detok is not None and out.new_token_ids:
            st.text += st.detok.add(out.new_token_ids)
        if out.finished and st.detok is not None:
            st.text += st.detok.flush()
        matched = None
        # Like EOS and stop token ids, stop strings wait for min_tokens (text of the first
        # min_tokens tokens is released at once and never matched).
        if st.stops and st.num_tokens > st.min_tokens:
            hit = find_stop(st.text, st.sent, st.stops)
            if hit is not None:
                end, matched = hit
                if st.include_stop:
                    end += len(matched)
            elif out.finished:
                end = len(st.text)
            else:
                end = len(st.text) - held_back(st.text, st.sent, st.stops)
        else:
            end = len(st.text)
        delta = st.text[st.sent:end]
        st.sent = end
        if matched is not None:
            out = dataclasses.replace(out, finished=True, finish_reason="stop",
                                      stop_reason=matched)
        if out.finished:
            self.remove(out.request_id)
        return dataclasses.replace(out, new_text=delta), matched


@dataclasses.dataclass
class Completion:
    """One finished sequence, accumulated from its deltas."""

    request_id: str
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, out: RequestOutput, now: float | None = None) -> None:
        """Accumulates one delta."""
        now = time.monotonic() if now is None else now
        if out.new_token_ids and self.first_token_time is None:
            self.first_token_time = now
        self.text += out.new_text
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.new_logprobs)
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens or self.num_cached_tokens
        if out.finished:
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason
            self.error = out.error
            self.finish_time = now

    @property
    def ttft_s(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def latency_s(self) -> float | None:
        if self.finish_time is None:
            return None
        return self.finish_time - self.arrival_time
