"""The programs a runner step runs on the device, as pure functions (the runner jits them).

  forward_step  one per (T, S) bucket: chained placeholders, the model forward, greedy sampling;
                returns the logits too. No lax.cond (a cond on a device predicate makes the host
                wait at dispatch, which would stall the dispatch-ahead engine loop).
  sampler_step  one per (S bucket, SamplerMode): the full sampler over forward_step's logits, for
                batches that need more than greedy decoding.
  full_step     forward + the cond-based sampler in one program (eval_shape and tests).
  sampler_mode  the host-side choice between them, from a batch's sampling controls.

Every program returns the sampled ids padded to i32[S_max] (the largest S bucket): a chained
next step reads its placeholder tokens from that array (`StepInputs.prev_sampled_index`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.runtime import sampling
from xlaserve.runtime.batch import SamplingInputs, StepInputs
from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models import llama


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the programs need to know about the model (static under jit)."""

    cfg: ModelConfig
    attention_impl: str
    attention_fn: llama.AttentionFn | None
    max_seqs: int  # S_max: the padded length of the sampled ids
    row_parallel_fn: llama.RowParallelFn | None = None  # o_proj / down_proj (tp's all-reduce)
    project_fn: llama.ProjectFn | None = None  # q/k/v in one launch (the decode GEMM)


def resolve_placeholders(inputs: StepInputs, prev_tokens: jax.Array | None) -> StepInputs:
    """Rows with prev_sampled_index >= 0 take their token from the previous step's output."""
    index = inputs.prev_sampled_index
    if prev_tokens is None or index is None:
        return inputs
    chained = prev_tokens[jnp.clip(index, 0, prev_tokens.shape[0] - 1)]
    return dataclasses.replace(inputs, token_ids=jnp.where(index >= 0, chained, inputs.token_ids))


def _pad(token_ids: jax.Array, max_seqs: int) -> jax.Array:
    return jnp.pad(token_ids, (0, max_seqs - token_ids.shape[0]))


def _logits(spec: ModelSpec, params: Any, kv_cache: llama.KVCache, inputs: StepInputs,
            prev_tokens: jax.Array | None,
            ) -> tuple[SamplingInputs, jax.Array, llama.KVCache]:
    """(inputs.sampling, f32 logits [S, V], kv_cache) of the forward over `inputs`."""
    smp = inputs.sampling
    if smp is None:
        raise ValueError("inputs.sampling=None inside the step; the runner fills it in")
    inputs = resolve_placeholders(inputs, prev_tokens)
    logits, kv_cache = llama.forward(params, inputs, kv_cache, spec.cfg,
                                     attention_impl=spec.attention_impl,
                                     attention_fn=spec.attention_fn,
                                     row_parallel_fn=spec.row_parallel_fn,
                                     project_fn=spec.project_fn)  # f32[S, V]
    return smp, logits, kv_cache


def full_step(spec: ModelSpec, params: Any, kv_cache: llama.KVCache, inputs: StepInputs,
              prev_tokens: jax.Array | None = None) -> tuple[Any, llama.KVCache]:
    """((SamplerOutput, padded ids), kv_cache) with the cond-based sampler (any batch)."""
    smp, logits, kv_cache = _logits(spec, params, kv_cache, inputs, prev_tokens)
    out = sampling.sample(logits, smp)
    return (out, _pad(out.token_ids, spec.max_seqs)), kv_cache


def forward_step(spec: ModelSpec, params: Any, kv_cache: llama.KVCache, inputs: StepInputs,
                 prev_tokens: jax.Array) -> tuple[Any, llama.KVCache]:
    """((greedy SamplerOutput, padded ids, f32 logits [S, V], the sampling controls without the
    histories), kv_cache). A batch that needs more than greedy runs `sampler_step` after it."""
    smp, logits, kv_cache = _logits(spec, params, kv_cache, inputs, prev_tokens)
    out = sampling.greedy(logits, smp)
    small = dataclasses.replace(smp, prompt_token_ids=None, output_token_ids=None,
                                logit_bias_ids=None, logit_bias=None)
    return (out, _pad(out.token_ids, spec.max_seqs), logits, small), kv_cache


def sampler_step(logits: jax.Array, small: SamplingInputs, prompt_hist: jax.Array,
                 output_hist: jax.Array, bias_ids: jax.Array, bias: jax.Array, *,
                 mode: sampling.SamplerMode, max_seqs: int) -> Any:
    """(SamplerOutput, padded ids) of the `mode` sampler over a forward_step's logits.
    bias_ids / bias: the batch's logit_bias [S, B] (all -1 ids when it has none)."""
    smp = dataclasses.replace(small, prompt_token_ids=prompt_hist, output_token_ids=output_hist,
                              logit_bias_ids=bias_ids, logit_bias=bias)
    out = sampling.sample(logits, smp, mode)
    return out, _pad(out.token_ids, max_seqs)


def sampler_mode(smp: SamplingInputs, *, num_logprobs: int | None, has_history: bool,
                 vocab_size: int, has_bias: bool = False) -> sampling.SamplerMode | None:
    """None when forward_step's greedy sampler covers every row, else the sampler to run."""
    top_n = bool(num_logprobs)
    if not (top_n or has_history or has_bias or (np.asarray(smp.temperature) > 0).any()):
        return None
    top_k, top_p = np.asarray(smp.top_k), np.asarray(smp.top_p)
    sort = bool((((top_k > 0) & (top_k < vocab_size)) | (top_p < 1.0)).any())
    return sampling.SamplerMode(sort=sort, top_n=top_n)
