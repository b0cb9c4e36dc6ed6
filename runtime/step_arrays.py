"""The arrays a runner step hands its compiled programs: the contract checks and the stand-ins.

`check_step_inputs` enforces the StepInputs contract (runtime/batch.py) that the compiled
programs rely on: dtypes, the page table's width, the logit_bias arrays' shape. `StandIns` holds
the constant device arrays that take the place of absent inputs, so a step copies nothing for
them: no placeholder rows, no penalty history at the compiled width W, no logit_bias, no previous
step. Split from model_runner.py, which compiles and runs the programs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from xlaserve.runtime.batch import (
    MAX_LOGIT_BIAS,
    MAX_MIN_TOKENS_STOP_IDS,
    SamplingInputs,
    StepInputs,
)


def greedy_sampling_inputs(num_seqs_bucket: int) -> SamplingInputs:
    """All-greedy sampling controls with no penalty history (W = 1)."""
    s = num_seqs_bucket
    return SamplingInputs(
        temperature=np.zeros(s, np.float32), top_k=np.zeros(s, np.int32),
        top_p=np.ones(s, np.float32), min_p=np.zeros(s, np.float32),
        repetition_penalty=np.ones(s, np.float32), presence_penalty=np.zeros(s, np.float32),
        frequency_penalty=np.zeros(s, np.float32), seeds=np.zeros(s, np.uint32),
        output_positions=np.zeros(s, np.int32), prompt_token_ids=np.full((s, 1), -1, np.int32),
        output_token_ids=np.full((s, 1), -1, np.int32), min_tokens=np.zeros(s, np.int32),
        min_tokens_stop_ids=np.full((s, MAX_MIN_TOKENS_STOP_IDS), -1, np.int32),
        want_top_logprobs=np.zeros(1, np.int32))


# The dtypes of the StepInputs contract (runtime/batch.py); compiled programs accept no other.
_STEP_DTYPES = {f.name: np.dtype(np.int32) for f in dataclasses.fields(StepInputs)
                if f.name != "sampling"}
_SAMPLING_DTYPES = {
    **dict.fromkeys(("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"), np.dtype(np.float32)),
    **dict.fromkeys(("top_k", "output_positions", "prompt_token_ids", "output_token_ids",
                     "min_tokens", "min_tokens_stop_ids", "want_top_logprobs"),
                    np.dtype(np.int32)),
    "seeds": np.dtype(np.uint32)}


def check_step_inputs(inputs: StepInputs, max_pages_per_seq: int) -> None:
    """Raises ValueError naming the StepInputs field whose dtype or shape the programs refuse."""
    for name, dtype in _STEP_DTYPES.items():
        if getattr(inputs, name) is None:  # prev_sampled_index: the runner fills it in
            continue
        got = np.dtype(getattr(inputs, name).dtype)
        if got != dtype:
            raise ValueError(f"inputs.{name}.dtype={got}: must be {dtype}")
    if inputs.sampling is not None:
        for name, dtype in _SAMPLING_DTYPES.items():
            got = np.dtype(getattr(inputs.sampling, name).dtype)
            if got != dtype:
                raise ValueError(f"inputs.sampling.{name}.dtype={got}: must be {dtype}")
        want = (inputs.num_seqs_bucket, MAX_LOGIT_BIAS)
        if (inputs.sampling.logit_bias_ids is None) != (inputs.sampling.logit_bias is None):
            raise ValueError("inputs.sampling.logit_bias_ids, logit_bias: give both or neither")
        for name, dtype in (("logit_bias_ids", np.int32), ("logit_bias", np.float32)):
            a = getattr(inputs.sampling, name)
            if a is not None and (np.shape(a) != want or np.dtype(a.dtype) != dtype):
                raise ValueError(f"inputs.sampling.{name}: {np.dtype(a.dtype)}"
                                 f"{list(np.shape(a))}, must be {np.dtype(dtype)}{list(want)}")
    if inputs.page_table.shape[-1] != max_pages_per_seq:
        raise ValueError(f"page_table.shape={inputs.page_table.shape}: width must be "
                         f"max_pages_per_seq={max_pages_per_seq}")


def bias_args(smp: SamplingInputs | None) -> tuple[Any, Any] | None:
    """The batch's (logit_bias_ids, logit_bias) when some row has a bias, else None."""
    if smp is None or smp.logit_bias_ids is None:
        return None
    if not bool((np.asarray(smp.logit_bias_ids) >= 0).any()):
        return None
    return smp.logit_bias_ids, smp.logit_bias


class StandIns:
    """Cached constant arrays for absent step inputs, made once per bucket.

    Args:
      sharding: where the device arrays live (the mesh's replicated sharding, or None).
      history_width: W, the penalty history width every program was compiled with.
      max_model_len: for the error of a history wider than W.
      max_seqs: the largest S bucket (the padded length of a step's sampled ids).
    """

    def __init__(self, sharding: jax.sharding.Sharding | None, history_width: int,
                 max_model_len: int, max_seqs: int) -> None:
        self.sharding = sharding
        self.history_width = history_width
        self.max_model_len = max_model_len
        self.max_seqs = max_seqs
        self._empty_history: dict[int, jax.Array] = {}  # S -> i32[S, W] of -1 on the device
        self._empty_bias: dict[int, tuple[jax.Array, jax.Array]] = {}  # S -> empty logit_bias
        self._no_chain: dict[int, np.ndarray] = {}  # T -> i32[T] of -1 (no placeholder rows)
        self._zero_tokens: jax.Array | None = None  # prev_tokens of an unchained step

    def no_chain(self, num_tokens: int) -> np.ndarray:
        """prev_sampled_index of a step with no placeholder rows: i32[T] of -1."""
        none = self._no_chain.get(num_tokens)
        if none is None:
            none = self._no_chain[num_tokens] = np.full(num_tokens, -1, np.int32)
        return none

    def zero_prev_tokens(self) -> jax.Array:
        """The previous step's sampled ids for an unchained step: zeros i32[S_max]."""
        if self._zero_tokens is None:
            zeros: jax.Array = jax.device_put(np.zeros(self.max_seqs, np.int32), self.sharding)
            self._zero_tokens = zeros
            return zeros
        return self._zero_tokens

    def no_bias(self, num_seqs: int) -> tuple[jax.Array, jax.Array]:
        """Device arrays of an empty logit_bias for S bucket `num_seqs` (nothing copied)."""
        pair = self._empty_bias.get(num_seqs)
        if pair is None:
            shape = (num_seqs, MAX_LOGIT_BIAS)
            pair = self._empty_bias[num_seqs] = (
                jax.device_put(np.full(shape, -1, np.int32), self.sharding),
                jax.device_put(np.zeros(shape, np.float32), self.sharding))
        return pair

    def fit_history(self, smp: SamplingInputs, num_seqs: int) -> SamplingInputs:
        """`smp` with both penalty histories at width W: padded with -1, or, with no history
        at all (the common case), one cached all -1 device array (nothing copied).

        Raises:
          ValueError: a history wider than W.
        """
        widths = (smp.prompt_token_ids.shape[-1], smp.output_token_ids.shape[-1])
        full = self.history_width
        if max(widths) > full:
            raise ValueError(
                f"sampling.output_token_ids width {max(widths)}: penalty history needs "
                f"enable_penalties=True and at most max_model_len={self.max_model_len} tokens")
        if widths == (full, full):  # both at the compiled width (else pad the narrower one)
            return smp
        has_history = bool((smp.prompt_token_ids >= 0).any() or (smp.output_token_ids >= 0).any())
        if not has_history:
            empty = self._empty_history.get(num_seqs)
            if empty is None:
                empty = jax.device_put(np.full((num_seqs, full), -1, np.int32), self.sharding)
                self._empty_history[num_seqs] = empty
            return dataclasses.replace(smp, prompt_token_ids=empty, output_token_ids=empty)

        def pad(a: np.ndarray) -> np.ndarray:
            a = np.asarray(a, np.int32)
            return np.pad(a, ((0, 0), (0, full - a.shape[-1])), constant_values=-1)
        return dataclasses.replace(smp, prompt_token_ids=pad(smp.prompt_token_ids),
                                   output_token_ids=pad(smp.output_token_ids))

    def has_history(self, smp: SamplingInputs) -> bool:
        """Whether any row has penalty history (the cached all -1 device arrays have none)."""
        for a in (smp.prompt_token_ids, smp.output_token_ids):
            if isinstance(a, jax.Array):
                if not any(a is e for e in self._empty_history.values()):
                    return True  # a device array we did not make: assume it has some
            elif bool((np.asarray(a) >= 0).any()):
                return True
        return False
