"""StepInputs: the fixed-shape arrays that cross from the host into the jitted step.

Host side (the scheduler) hands a SchedulerOutput to `build`, which pads everything to a shape
bucket (T tokens, S sequences) so that every step reuses one of a few compiled programs. This is
one of the two places where host data meets jax (the other is model_runner.py); the only jax use
here is registering StepInputs as a pytree.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence

import jax
import numpy as np

from xlaserve.runtime.request import MAX_LOGIT_BIAS, SamplingParams
from xlaserve.runtime.scheduler import ScheduledSeq, SchedulerOutput


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingInputs:
    """Per-sequence sampling controls, padded to S. Padded rows are greedy and ignored."""

    temperature: np.ndarray  # f32[S]; 0 = greedy
    top_k: np.ndarray  # i32[S]; 0 = off
    top_p: np.ndarray  # f32[S]; 1 = off
    min_p: np.ndarray  # f32[S]; 0 = off
    repetition_penalty: np.ndarray  # f32[S]; 1 = off
    presence_penalty: np.ndarray  # f32[S]; 0 = off
    frequency_penalty: np.ndarray  # f32[S]; 0 = off
    seeds: np.ndarray  # u32[S]; per-request seed. key = fold_in(PRNGKey(seed), output_position)
    output_positions: np.ndarray  # i32[S]; index of the token being sampled in the output
    # Token history for penalties: prompt and output ids per sequence, -1 padded. [S, W]
    # W is 1 (all -1) when no request in the batch uses a penalty, so the common case moves nothing.
    prompt_token_ids: np.ndarray  # i32[S, W]
    output_token_ids: np.ndarray  # i32[S, W]
    # min_tokens: while output_positions < min_tokens, the ids in min_tokens_stop_ids (EOS and
    # the request's stop token ids, -1 padded to MAX_MIN_TOKENS_STOP_IDS) cannot be sampled.
    min_tokens: np.ndarray  # i32[S]; 0 = off
    min_tokens_stop_ids: np.ndarray  # i32[S, E]
    # 1 when some request of the step asked for top-n logprobs: the top-k over the vocabulary is
    # computed only then (set by the runner from execute(num_logprobs=...)).
    want_top_logprobs: np.ndarray  # i32[1]
    # logit_bias: ids (-1 padded) and biases per row, [S, MAX_LOGIT_BIAS]; None when no request
    # of the batch has one. Only the sampler program reads them (the runner passes a cached
    # empty pair otherwise), never the forward program.
    logit_bias_ids: np.ndarray | None = None  # i32[S, B]
    logit_bias: np.ndarray | None = None  # f32[S, B]


# E: how many stop ids (EOS + stop_token_ids) min_tokens can hold back per request.
MAX_MIN_TOKENS_STOP_IDS = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """All scheduled tokens of all sequences in one step, flattened and padded to a bucket.

    Sequences are laid out back to back: the q rows of sequence s are
    ``cu_q_lens[s]:cu_q_lens[s+1]``. Padded token rows write their K/V to page 0 (the reserved
    padding page) and belong to no sequence; padded sequences (index >= num_seqs) have zero
    q length and zero kv length.
    """

    token_ids: np.ndarray  # i32[T]
    positions: np.ndarray  # i32[T]; position of each token in its sequence
    slot_mapping: np.ndarray  # i32[T]; page * page_size + offset for the token's K/V (pad -> 0)
    cu_q_lens: np.ndarray  # i32[S+1]; prefix sums of the q length of each sequence
    kv_lens: np.ndarray  # i32[S]; tokens in the cache after this step, new tokens included
    page_table: np.ndarray  # i32[S, max_pages_per_seq]; page ids of each sequence (pad -> 0)
    num_seqs: np.ndarray  # i32[1]; real sequences in this step
    logits_indices: np.ndarray  # i32[S]; token row whose logits are sampled for each sequence
    sampling: SamplingInputs | None = None  # None in model-only use (tests, profile of forward)
    # i32[T]: -1, or the row of the previous step's sampled ids that is this row's token (a
    # placeholder resolved on the device, so the step can be dispatched before the previous
    # one finishes; see chain_placeholders). None = all -1 (the runner fills it in).
    prev_sampled_index: np.ndarray | None = None

    @property
    def num_tokens_bucket(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs_bucket(self) -> int:
        return int(self.kv_lens.shape[0])


def choose_bucket(n: int, buckets: Sequence[int], field: str = "n") -> int:
    """Smallest bucket >= n. Raises ValueError naming `field` when n exceeds the largest."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{field}={n}: exceeds the largest bucket {max(buckets)}")


def history_width(n: int) -> int:
    """Power-of-two width (>= 1) for a token-history array holding `n` ids."""
    w = 1
    while w < n:
        w *= 2
    return w


def build(sched_out: SchedulerOutput, *, page_size: int, token_buckets: Sequence[int],
          seq_buckets: Sequence[int], max_pages_per_seq: int,
          max_history: int | None = None,
          eos_token_ids: Sequence[int] = ()) -> StepInputs:
    """Lays out one step's scheduled sequences as bucket-padded StepInputs.

    Args:
      sched_out: the scheduler's choice for this step (decode rows first).
      page_size: L, tokens per page.
      token_buckets: allowed T sizes, ascending; T = the smallest >= the scheduled tokens.
      seq_buckets: allowed S sizes, ascending; S = the smallest >= the scheduled sequences.
      max_pages_per_seq: width of the page table.
      max_history: cap on the penalty history width W (max_model_len); W is otherwise a power
        of two >= the longest history in the batch.
      eos_token_ids: the model's EOS ids, held back (with stop_token_ids) until min_tokens.
    Returns:
      StepInputs with padded token rows (token 0, position 0, slot 0 = page 0) and padded
      sequences of zero length whose page-table rows are 0.
    Raises:
      ValueError: more tokens or sequences than the largest bucket, or a sequence needing more
        than max_pages_per_seq pages.
    """
    seqs = sched_out.seqs
    num_tokens = sched_out.num_scheduled_tokens
    T = choose_bucket(num_tokens, token_buckets, "num_scheduled_tokens")
    S = choose_bucket(len(seqs), seq_buckets, "num_seqs")
    if S > T and S <= token_buckets[-1]:  # prefer a program with S <= T
        T = choose_bucket(S, token_buckets, "num_seqs")
    # Else S is the bucket of the most sequences T rows can hold: the runner compiles (T, S) too
    # (ModelRunner.bucket_keys), e.g. T = max_num_batched_tokens = 20 with S buckets (8, 16, 32).
    n_seqs = len(seqs)
    page_table = np.zeros((S, max_pages_per_seq), np.int32)
    for s, seq in enumerate(seqs):
        if len(seq.page_ids) > max_pages_per_seq:
            raise ValueError(f"page_ids: {seq.request_id} has {len(seq.page_ids)} pages > "
                             f"max_pages_per_seq={max_pages_per_seq}")
        page_table[s, :len(seq.page_ids)] = seq.page_ids
    # Vectorised over all rows: row r belongs to sequence seq_of[r].
    q_lens = np.fromiter((q.num_new_tokens for q in seqs), np.int32, n_seqs)
    starts = np.fromiter((q.start_position for q in seqs), np.int32, n_seqs)
    cu_q_lens = np.zeros(S + 1, np.int32)
    np.cumsum(q_lens, out=cu_q_lens[1:n_seqs + 1])
    cu_q_lens[n_seqs + 1:] = num_tokens  # padded sequences: zero q length
    seq_of = np.repeat(np.arange(n_seqs), q_lens)
    pos = np.arange(num_tokens, dtype=np.int32) - np.repeat(cu_q_lens[:n_seqs] - starts, q_lens)
    token_ids = np.zeros(T, np.int32)
    token_ids[:num_tokens] = np.fromiter(itertools.chain.from_iterable(
        q.token_ids for q in seqs), np.int32, num_tokens)
    positions = np.zeros(T, np.int32)
    positions[:num_tokens] = pos
    slot_mapping = np.zeros(T, np.int32)  # padded rows write slot 0 (page 0)
    slot_mapping[:num_tokens] = (page_table[seq_of, pos // page_size] * page_size
                                 + pos % page_size)
    kv_lens = np.zeros(S, np.int32)
    kv_lens[:n_seqs] = starts + q_lens
    logits_indices = np.zeros(S, np.int32)
    logits_indices[:n_seqs] = cu_q_lens[1:n_seqs + 1] - 1
    return StepInputs(token_ids, positions, slot_mapping, cu_q_lens, kv_lens, page_table,
                      np.array([len(seqs)], np.int32), logits_indices,
                      _sampling_inputs(seqs, S, max_history, tuple(eos_token_ids)))


def min_tokens_stop_ids(sampling: SamplingParams, eos_token_ids: Sequence[int]) -> list[int]:
    """The ids a request may not sample before min_tokens: EOS (unless ignored) + stop ids."""
    ids = [] if sampling.ignore_eos else list(eos_token_ids)
    ids += [t for t in sampling.stop_token_ids if t not in ids]
    return ids


def _sampling_inputs(seqs: Sequence[ScheduledSeq], S: int, max_history: int | None,
                     eos_token_ids: tuple[int, ...] = ()) -> SamplingInputs:
    def col(fn: Callable[[SamplingParams], float], default: float, dtype: type) -> np.ndarray:
        a = np.full(S, default, dtype)
        a[:len(seqs)] = [fn(q.sampling) for q in seqs]
        return a

    seeds = np.zeros(S, np.uint32)
    seeds[:len(seqs)] = [(q.sampling.seed or 0) & 0xFFFFFFFF for q in seqs]
    out_pos = np.zeros(S, np.int32)
    out_pos[:len(seqs)] = [q.output_position for q in seqs]
    hist = [q for q in seqs if q.prompt_token_ids is not None]
    longest = max([max(len(q.prompt_token_ids or ()), len(q.output_token_ids or ()) + q.placeholder)
                   for q in hist], default=1)
    W = history_width(longest)
    if max_history is not None:
        W = max(min(W, max_history), longest)
    prompt_hist = np.full((S, W), -1, np.int32)
    output_hist = np.full((S, W), -1, np.int32)
    for s, q in enumerate(seqs):
        if q.prompt_token_ids is not None:
            prompt_hist[s, :len(q.prompt_token_ids)] = q.prompt_token_ids
        if q.output_token_ids:
            output_hist[s, :len(q.output_token_ids)] = q.output_token_ids
    min_tokens = np.zeros(S, np.int32)
    stop_ids = np.full((S, MAX_MIN_TOKENS_STOP_IDS), -1, np.int32)
    for s, q in enumerate(seqs):
        if q.output_position < q.sampling.min_tokens:
            ids = min_tokens_stop_ids(q.sampling, eos_token_ids)[:MAX_MIN_TOKENS_STOP_IDS]
            min_tokens[s] = q.sampling.min_tokens
            stop_ids[s, :len(ids)] = ids
    bias_ids = bias = None
    if any(q.sampling.logit_bias for q in seqs):
        bias_ids = np.full((S, MAX_LOGIT_BIAS), -1, np.int32)
        bias = np.zeros((S, MAX_LOGIT_BIAS), np.float32)
        for s, q in enumerate(seqs):
            if q.sampling.logit_bias:
                ids_row, bias_row = _bias_rows(q.sampling.logit_bias)
                bias_ids[s, :len(ids_row)], bias[s, :len(bias_row)] = ids_row, bias_row
    return SamplingInputs(
        temperature=col(lambda p: p.temperature, 0.0, np.float32),
        top_k=col(lambda p: p.top_k, 0, np.int32),
        top_p=col(lambda p: p.top_p, 1.0, np.float32),
        min_p=col(lambda p: p.min_p, 0.0, np.float32),
        repetition_penalty=col(lambda p: p.repetition_penalty, 1.0, np.float32),
        presence_penalty=col(lambda p: p.presence_penalty, 0.0, np.float32),
        frequency_penalty=col(lambda p: p.frequency_penalty, 0.0, np.float32),
        seeds=seeds, output_positions=out_pos,
        prompt_token_ids=prompt_hist, output_token_ids=output_hist,
        min_tokens=min_tokens, min_tokens_stop_ids=stop_ids,
        want_top_logprobs=np.array([any(q.sampling.logprobs for q in seqs)], np.int32),
        logit_bias_ids=bias_ids, logit_bias=bias)


@functools.lru_cache(maxsize=1024)
def _bias_rows(logit_bias: tuple[tuple[int, float], ...]) -> tuple[np.ndarray, np.ndarray]:
    """A request's logit_bias as (i32 ids, f32 biases) rows, made once per distinct bias (a
    Python loop over 300 entries x 256 rows took ~14 ms a step)."""
    ids = np.array([t for t, _ in logit_bias], np.int32)
    vals = np.array([b for _, b in logit_bias], np.float32)
    ids.flags.writeable = vals.flags.writeable = False
    return ids, vals


def chain_placeholders(inputs: StepInputs, sched_out: SchedulerOutput,
                       prev: SchedulerOutput) -> StepInputs:
    """`inputs` with its placeholder rows pointed at the previous step's sampled ids.

    The device then takes each placeholder row's token from the previous step's output, so this
    step can be dispatched before that output reaches the host. Only for steps whose placeholders
    have no penalty history (the history's last token would be unknown): see `can_chain`.

    Raises:
      RuntimeError: a placeholder whose request did not sample in the previous step (a bug).
    """
    row_of = {q.request_id: i for i, q in enumerate(prev.seqs) if q.samples}
    index = np.full(inputs.num_tokens_bucket, -1, np.int32)
    for s, q in enumerate(sched_out.seqs):
        if not q.placeholder:
            continue
        if q.request_id not in row_of:
            raise RuntimeError(f"{q.request_id}: placeholder without a token in the previous step")
        index[int(inputs.cu_q_lens[s + 1]) - 1] = row_of[q.request_id]
    return dataclasses.replace(inputs, prev_sampled_index=index)


def can_chain(sched_out: SchedulerOutput) -> bool:
    """True when no placeholder row needs its token on the host (penalty history)."""
    return all(q.output_token_ids is None for q in sched_out.seqs if q.placeholder)


def fill_placeholders(inputs: StepInputs, sched_out: SchedulerOutput, prev: SchedulerOutput,
                      prev_sampled: np.ndarray) -> None:
    """Writes the previous step's sampled tokens into this step's placeholder rows (in place).

    Args:
      inputs: this step's StepInputs, built from `sched_out` but not yet dispatched.
      sched_out: this step's schedule; seqs with `placeholder` end with an unknown token.
      prev: the previous step's schedule; prev_sampled[i] is the token of prev.seqs[i].
      prev_sampled: i32[S_prev]; the previous step's sampled ids.
    Raises:
      RuntimeError: a placeholder whose request did not sample in the previous step (a bug).
    """
    row_of = {q.request_id: i for i, q in enumerate(prev.seqs) if q.samples}
    for s, q in enumerate(sched_out.seqs):
        if not q.placeholder:
            continue
        if q.request_id not in row_of:
            raise RuntimeError(f"{q.request_id}: placeholder without a token in the previous step")
        tok = int(prev_sampled[row_of[q.request_id]])
        inputs.token_ids[int(inputs.cu_q_lens[s + 1]) - 1] = tok
        if inputs.sampling is not None and q.output_token_ids is not None:
            inputs.sampling.output_token_ids[s, len(q.output_token_ids)] = tok
