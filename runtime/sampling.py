"""On-device sampling: penalties, temperature, top-k, top-p, min-p, per-request PRNG, logprobs.

Pure jnp over fixed-shape arrays; every control is a per-row array from `SamplingInputs`, so one
compiled program serves any mix of greedy and sampled requests. Runs inside the runner's jitted
step: only the sampled ids (and, when asked, logprobs) ever leave the device.

Order of operations for each row (HF / vLLM semantics):
  0. logit_bias: each listed token's bias is added to its logit (vLLM v1 applies it before the
     penalties too);
  1. repetition penalty over prompt + output tokens (HF: positive logits are divided by the
     penalty, negative ones multiplied), then presence / frequency penalties over output tokens
     (OpenAI: ``logit -= frequency * count + presence * (count > 0)``);
  2. temperature == 0: the token is exactly ``argmax`` of the (penalized) float32 logits;
  3. otherwise divide by the temperature, keep the top-k tokens, then the smallest prefix of the
     renormalized distribution whose mass reaches top-p, then the tokens with
     ``p >= min_p * p_max``; sample with the Gumbel-max trick.
Filters are thresholds on the logit value, so tokens tied with the last kept token are kept too.
Where vLLM v1 differs: it applies min-p before top-k / top-p (we follow HF and vLLM v0), cuts
top-p ties by sort position, and treats temperature < 1e-5 as greedy (here any temperature > 0
samples; a tiny one is argmax except among exactly tied logits).

Randomness: row s uses ``fold_in(PRNGKey(seeds[s]), output_positions[s])``, so a request's sample
depends on its logits, seed and output position only, never on its row or its batch-mates.

Logprobs are those of the raw model distribution (``log_softmax`` of the logits before penalties
and temperature, vLLM's default). The top-n alternatives are always computed for
``MAX_TOP_LOGPROBS`` (the SamplingParams maximum), so asking for logprobs never needs another
compiled program; they are computed (under a lax.cond on `want_top_logprobs`) and copied to the
host only when a request of the step asks.

This module does not know about buckets, the host, or which requests asked for logprobs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from xlaserve.runtime.batch import SamplingInputs

MAX_TOP_LOGPROBS = 20  # SamplingParams.logprobs is validated to [0, 20]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """What the sampler produces on device for one step (all rows of the S bucket)."""

    token_ids: jax.Array  # i32[S]; sampled (or greedy) token of each row
    logprobs: jax.Array  # f32[S]; raw-model logprob of the sampled token
    top_logprob_ids: jax.Array  # i32[S, n]; n = min(MAX_TOP_LOGPROBS, V), best first
    top_logprobs: jax.Array  # f32[S, n]


def _token_counts(token_ids: jax.Array, vocab_size: int) -> jax.Array:
    """Counts of each vocab id per row. token_ids i32[S, W] with -1 padding -> i32[S, V]."""
    s, _ = token_ids.shape
    rows = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], token_ids.shape)
    # Padding (-1) and anything out of range goes to index V and is dropped by the scatter.
    cols = jnp.where((token_ids >= 0) & (token_ids < vocab_size), token_ids, vocab_size)
    counts = jnp.zeros((s, vocab_size), jnp.int32)
    return counts.at[rows, cols].add(1, mode="drop")


def apply_penalties(logits: jax.Array, sampling: SamplingInputs) -> jax.Array:
    """Applies repetition, presence and frequency penalties.

    Args:
      logits: f32[S, V].
      sampling: per-row controls; prompt_token_ids / output_token_ids are i32[S, W], -1 padded.
    Returns:
      f32[S, V], equal to `logits` in rows whose penalties are off (1, 0, 0) or that have no
      history.
    """
    v = logits.shape[-1]
    out_counts = _token_counts(jnp.asarray(sampling.output_token_ids), v)  # [S, V]
    prompt_counts = _token_counts(jnp.asarray(sampling.prompt_token_ids), v)  # [S, V]
    rep = jnp.asarray(sampling.repetition_penalty, jnp.float32)[:, None]  # [S, 1]
    seen = (out_counts + prompt_counts) > 0
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    logits = jnp.where(seen, penalized, logits)
    freq = jnp.asarray(sampling.frequency_penalty, jnp.float32)[:, None]
    pres = jnp.asarray(sampling.presence_penalty, jnp.float32)[:, None]
    return logits - freq * out_counts.astype(jnp.float32) - pres * (out_counts > 0)


def _top_k_top_p_threshold(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Smallest logit each row keeps under top-k then top-p. scaled f32[S, V] -> f32[S, 1]."""
    v = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # [S, V]
    k = jnp.where((top_k <= 0) | (top_k > v), v, top_k)  # [S]
    rank = jnp.arange(v, dtype=jnp.int32)[None, :]  # [1, V]
    in_top_k = rank < k[:, None]  # [S, V]
    masked = jnp.where(in_top_k, sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(masked, axis=-1)  # renormalized over the top-k
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive prefix sum
    # Keep the shortest prefix whose mass reaches top_p; rank 0 is always kept. top_p = 1 keeps
    # everything: the float32 cumsum can reach 1.0 before the tail, which `< 1` would drop.
    keep = in_top_k & ((mass_before < top_p[:, None]) | (rank == 0) | (top_p[:, None] >= 1.0))
    num_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)  # [S]
    return jnp.take_along_axis(sorted_desc, (num_keep - 1)[:, None], axis=-1)


@dataclasses.dataclass(frozen=True)
class SamplerMode:
    """Which optional stages a compiled sampler contains, chosen on the host (static).

    A lax.cond on a device predicate makes the host wait, at dispatch, until the device has
    computed the predicate; in a serving loop that dispatches step N+1 while step N runs, that
    wait stalls the whole pipeline (measured: bench/results/latency_flags_h200.json). So the
    runner's programs have no cond: the host, which knows every request's controls, picks a
    mode. Stages that are off are absent from the program; the host must only pick a mode that
    covers every row of the batch.

    Attributes:
      sort: top-k / top-p filters (a sort over the vocabulary).
      top_n: the top-MAX_TOP_LOGPROBS logprobs (a top_k over the vocabulary).
    Penalties, temperature draws and min-p are always in a non-greedy sampler; the greedy one
    (`greedy`) has none of them.
    """

    sort: bool = False
    top_n: bool = False


SAMPLER_MODES = tuple(SamplerMode(sort=a, top_n=b) for a in (False, True) for b in (False, True))


def filtered_logits(logits: jax.Array, sampling: SamplingInputs, *,
                    sort: bool | None = None) -> jax.Array:
    """Temperature-scaled logits with tokens outside top-k / top-p / min-p set to -inf.

    Penalties must already be applied. Rows with temperature 0 are scaled by 1 (the caller uses
    argmax for them). The result's softmax is the distribution `sample` draws from.

    Args:
      logits: f32[S, V].
      sampling: per-row controls.
      sort: None: the top-k / top-p sort runs under a lax.cond (only when some row uses them);
        True / False: always / never (static; False ignores top_k and top_p).
    Returns:
      f32[S, V].
    """
    temperature = jnp.asarray(sampling.temperature, jnp.float32)  # [S]
    top_k = jnp.asarray(sampling.top_k, jnp.int32)  # [S]
    top_p = jnp.asarray(sampling.top_p, jnp.float32)  # [S]
    min_p = jnp.asarray(sampling.min_p, jnp.float32)  # [S]
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / safe_t[:, None]  # [S, V]
    row_max = jnp.max(scaled, axis=-1, keepdims=True)  # [S, 1]
    # The full sort is only paid when some row uses top-k or top-p.
    if sort is None:
        needs_sort = jnp.any(((top_k > 0) & (top_k < scaled.shape[-1])) | (top_p < 1.0))
        threshold = jax.lax.cond(needs_sort, _top_k_top_p_threshold,
                                 lambda x, _k, _p: jnp.full_like(row_max, -jnp.inf),
                                 scaled, top_k, top_p)
    elif sort:
        threshold = _top_k_top_p_threshold(scaled, top_k, top_p)
    else:
        threshold = jnp.full_like(row_max, -jnp.inf)
    # min-p: p >= min_p * p_max  <=>  logit >= max + log(min_p); renormalizing after top-k /
    # top-p scales every p alike, so the order of the filters does not matter here.
    min_p_threshold = jnp.where(min_p[:, None] > 0, row_max + jnp.log(min_p[:, None]), -jnp.inf)
    keep = (scaled >= threshold) & (scaled >= min_p_threshold)
    return jnp.where(keep, scaled, -jnp.inf)


def row_keys(seeds: ArrayLike, output_positions: ArrayLike) -> jax.Array:
    """Per-row PRNG keys: fold_in(PRNGKey(seed), output_position). u32[S], i32[S] -> keys[S]."""
    def one(seed: jax.Array, pos: jax.Array) -> jax.Array:
        return jax.random.fold_in(jax.random.PRNGKey(seed), pos)
    return jax.vmap(one)(jnp.asarray(seeds, jnp.uint32), jnp.asarray(output_positions, jnp.int32))


def _draw(logits: jax.Array, sampling: SamplingInputs, sort: bool | None = None) -> jax.Array:
    """Samples one token per row from softmax(filtered_logits) with the Gumbel-max trick."""
    keys = row_keys(sampling.seeds, sampling.output_positions)
    v = logits.shape[-1]
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(keys)  # [S, V]
    filtered = filtered_logits(logits, sampling, sort=sort)
    return jnp.argmax(filtered + gumbel, axis=-1).astype(jnp.int32)


def apply_logit_bias(logits: jax.Array, sampling: SamplingInputs) -> jax.Array:
    """logits + each row's logit_bias (ids -1 padded). Unchanged when the batch has none.

    Args:
      logits: f32[S, V].
      sampling: logit_bias_ids i32[S, B] and logit_bias f32[S, B], or None.
    """
    if sampling.logit_bias_ids is None:
        return logits
    s, v = logits.shape
    ids = jnp.asarray(sampling.logit_bias_ids)
    rows = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], ids.shape)
    cols = jnp.where((ids >= 0) & (ids < v), ids, v)  # v: dropped
    return logits.at[rows, cols].add(jnp.asarray(sampling.logit_bias, jnp.float32), mode="drop")


def suppress_early_stops(logits: jax.Array, sampling: SamplingInputs) -> jax.Array:
    """min_tokens: rows with output_position < min_tokens cannot sample their stop ids.

    Args:
      logits: f32[S, V].
      sampling: min_tokens i32[S] and min_tokens_stop_ids i32[S, E] (-1 padded).
    Returns:
      f32[S, V] with those ids at -inf in the rows still under their minimum.
    """
    s, v = logits.shape
    ids = jnp.asarray(sampling.min_tokens_stop_ids)  # [S, E]
    active = jnp.asarray(sampling.output_positions) < jnp.asarray(sampling.min_tokens)  # [S]
    rows = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], ids.shape)
    cols = jnp.where((ids >= 0) & (ids < v) & active[:, None], ids, v)  # v: dropped
    banned = jnp.zeros((s, v), jnp.bool_).at[rows, cols].set(True, mode="drop")
    return jnp.where(banned, -jnp.inf, logits)


def greedy(logits: jax.Array, sampling: SamplingInputs) -> SamplerOutput:
    """The greedy sampler: argmax (min_tokens applied) and its raw logprob; no cond.

    Equal to `sample` for rows with temperature 0, no penalty history and no logit_bias. The
    top-n fields are zeros (a batch that asks for them takes a sampler with SamplerMode.top_n).
    """
    logits = logits.astype(jnp.float32)
    token_ids = jnp.argmax(suppress_early_stops(logits, sampling), axis=-1).astype(jnp.int32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [S]
    chosen = jnp.take_along_axis(logits, token_ids[:, None], axis=-1)[:, 0] - log_z
    s, v = logits.shape
    n = min(MAX_TOP_LOGPROBS, v)
    return SamplerOutput(token_ids=token_ids, logprobs=chosen,
                         top_logprob_ids=jnp.zeros((s, n), jnp.int32),
                         top_logprobs=jnp.zeros((s, n), jnp.float32))


def sample(logits: jax.Array, sampling: SamplingInputs, mode: SamplerMode | None = None,
           ) -> SamplerOutput:
    """Samples one token per row and computes raw logprobs.

    Args:
      logits: f32[S, V] (cast to float32 if not).
      sampling: per-row controls (padded rows are greedy and their tokens ignored).
      mode: None: every stage, the optional ones under lax.conds on device predicates (any
        batch; the host waits at dispatch for the predicates). A SamplerMode: no cond; the
        stages it turns off must not be needed by any row (the runner checks on the host).
    Returns:
      SamplerOutput with token ids, the sampled token's logprob and the top-n logprobs.
    """
    if mode is not None:
        return _sample_static(logits, sampling, mode)
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(sampling.temperature, jnp.float32)
    # The [S, V] count tables are only built when some row has a history (W=1 batches: none).
    has_history = (jnp.any(jnp.asarray(sampling.prompt_token_ids) >= 0)
                   | jnp.any(jnp.asarray(sampling.output_token_ids) >= 0))
    biased = apply_logit_bias(logits, sampling)
    penalized = jax.lax.cond(has_history, apply_penalties, lambda x, _s: x, biased, sampling)
    penalized = suppress_early_stops(penalized, sampling)
    greedy = jnp.argmax(penalized, axis=-1).astype(jnp.int32)  # [S]
    # Skip the noise and filters entirely when every row is greedy (the common padded decode).
    drawn = jax.lax.cond(jnp.any(temperature > 0), _draw,
                         lambda _l, _s: jnp.zeros_like(greedy), penalized, sampling)
    token_ids = jnp.where(temperature > 0, drawn, greedy)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [S]
    chosen = jnp.take_along_axis(logits, token_ids[:, None], axis=-1)[:, 0] - log_z
    s, v = logits.shape
    n = min(MAX_TOP_LOGPROBS, v)

    def top_n(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        lp, ids = jax.lax.top_k(x - log_z[:, None], n)
        return lp, ids.astype(jnp.int32)

    def skip(_x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.zeros((s, n), jnp.float32), jnp.zeros((s, n), jnp.int32)

    # A top-k over the whole vocabulary costs about as much as a small forward at large S: only
    # when some request of the step asked for top-n logprobs.
    want = jnp.asarray(sampling.want_top_logprobs).reshape(-1)[0] > 0
    top_lp, top_ids = jax.lax.cond(want, top_n, skip, logits)
    return SamplerOutput(token_ids=token_ids, logprobs=chosen,
                         top_logprob_ids=top_ids, top_logprobs=top_lp)


def _sample_static(logits: jax.Array, sampling: SamplingInputs, mode: SamplerMode,
                   ) -> SamplerOutput:
    """`sample` with its optional stages fixed by `mode` (no lax.cond)."""
    logits = logits.astype(jnp.float32)
    temperature = jnp.asarray(sampling.temperature, jnp.float32)
    penalized = suppress_early_stops(apply_penalties(apply_logit_bias(logits, sampling),
                                                     sampling), sampling)
    greedy_ids = jnp.argmax(penalized, axis=-1).astype(jnp.int32)
    drawn = _draw(penalized, sampling, sort=mode.sort)
    token_ids = jnp.where(temperature > 0, drawn, greedy_ids)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, token_ids[:, None], axis=-1)[:, 0] - log_z
    s, v = logits.shape
    n = min(MAX_TOP_LOGPROBS, v)
    if mode.top_n:
        top_lp, top_ids = jax.lax.top_k(logits - log_z[:, None], n)
        top_ids = top_ids.astype(jnp.int32)
    else:
        top_lp, top_ids = jnp.zeros((s, n), jnp.float32), jnp.zeros((s, n), jnp.int32)
    return SamplerOutput(token_ids=token_ids, logprobs=chosen, top_logprob_ids=top_ids,
                         top_logprobs=top_lp)
