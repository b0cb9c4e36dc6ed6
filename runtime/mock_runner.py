"""MockRunner: the ModelRunner interface with hand-computable tokens and no model (JetStream idea).

It keeps a host mirror of the KV cache that stores, for every slot, the token id written there.
Each step it writes the step's tokens through `slot_mapping`, then reads every sequence's whole
context back through its page table, exactly as attention would. So a bookkeeping bug (a wrong
slot, a reused page, a bad prefix-cache hit, a missing recompute) changes the tokens it returns,
just as it would change a real model's output:

- greedy (temperature 0): next = mock_next_token(context) = (sum(context) + 17 * len(context)) % V
- temperature > 0: next = mock_sampled_token(seed, output_position) (independent of the batch)

Reading a slot that was never written, or a sequence with no new token, raises RuntimeError. Every
(T, S) bucket pair counts as "compiled" by `warmup()`; any other shape afterwards increments
`compiles_after_warmup`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xlaserve.runtime.batch import StepInputs
from xlaserve.runtime.config import CacheConfig, SchedulerConfig, pages_needed, pow2_buckets


@dataclasses.dataclass(frozen=True)
class RunnerOutput:
    """Same fields as model_runner.RunnerOutput (the engine reads them by name)."""

    sampled_token_ids: np.ndarray  # i32[S_bucket]
    logprobs: np.ndarray | None = None  # f32[S]
    top_logprob_ids: np.ndarray | None = None  # i32[S, n]
    top_logprobs: np.ndarray | None = None  # f32[S, n]


def mock_next_token(context: list[int] | np.ndarray, vocab_size: int) -> int:
    """The greedy token MockRunner returns after `context` (prompt + outputs so far)."""
    ctx = np.asarray(context, np.int64)
    return int((ctx.sum() + 17 * len(ctx)) % vocab_size)


def mock_sampled_token(seed: int, output_position: int, vocab_size: int) -> int:
    """The token MockRunner returns when temperature > 0: a function of seed and position only."""
    x = (int(seed) * 1_000_003 + int(output_position) * 7919 + 12345) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0x5BD1E995) & 0xFFFFFFFF
    x ^= x >> 15
    return int(x % vocab_size)


class _Done:
    def __init__(self, out: RunnerOutput):
        self._out = out

    def result(self) -> RunnerOutput:
        return self._out


class MockRunner:
    """Drop-in for ModelRunner in scheduler/engine/server tests.

    Args:
      cache_cfg: page size; num_pages (default 64 when None).
      sched_cfg: bucket maxima and max_model_len.
      vocab_size: V of the mock model.

    With ``num_logprobs=n`` a step also returns logprob -(token % 7) / 8 for the sampled token and
    a top-n list [token, token+1, ...] with logprobs decreasing by 1.
    """

    def __init__(self, cache_cfg: CacheConfig, sched_cfg: SchedulerConfig, *,
                 vocab_size: int = 1000):
        self.page_size = cache_cfg.page_size
        self.num_pages = cache_cfg.num_pages if cache_cfg.num_pages is not None else 64
        self.max_pages_per_seq = pages_needed(sched_cfg.max_model_len, self.page_size)
        self.token_buckets = pow2_buckets(16, sched_cfg.max_num_batched_tokens)
        self.seq_buckets = pow2_buckets(8, sched_cfg.max_num_seqs)
        self.vocab_size = vocab_size
        self.compiles_after_warmup = 0
        self.num_steps = 0
        self.num_chained_steps = 0  # steps dispatched with placeholder rows read from `prev`
        self._compiled: set[tuple[int, int]] = set()
        self._warm = False
        self._kv = np.full(self.num_pages * self.page_size, -1, np.int64)  # token id per slot

    def warmup(self) -> None:
        # The same (T, S) pairs as ModelRunner.bucket_keys.
        self._compiled = set()
        for t in self.token_buckets:
            most = min(t, self.seq_buckets[-1])
            top = next(s for s in self.seq_buckets if s >= most)
            self._compiled |= {(t, s) for s in self.seq_buckets if s <= most or s == top}
        self._warm = True

    def execute_async(self, inputs: StepInputs, *, num_logprobs: int | None = None,
                      prev: _Done | None = None) -> _Done:
        index = inputs.prev_sampled_index
        if index is not None and (index >= 0).any():  # chained: tokens from prev's output
            if prev is None:
                raise ValueError("inputs.prev_sampled_index points at a previous step: pass prev")
            prev_ids = prev.result().sampled_token_ids
            rows = np.flatnonzero(index >= 0)
            token_ids = inputs.token_ids.copy()
            token_ids[rows] = prev_ids[index[rows]]
            inputs = dataclasses.replace(inputs, token_ids=token_ids)
            self.num_chained_steps += 1
        return _Done(self.execute(inputs, num_logprobs=num_logprobs))

    def execute(self, inputs: StepInputs, *, num_logprobs: int | None = None) -> RunnerOutput:
        T, S = inputs.num_tokens_bucket, inputs.num_seqs_bucket
        if (T, S) not in self._compiled:
            self._compiled.add((T, S))
            if self._warm:
                self.compiles_after_warmup += 1
        if T not in self.token_buckets or S not in self.seq_buckets:
            raise ValueError(f"shape (T={T}, S={S}) is not a bucket")
        self.num_steps += 1
        L = self.page_size
        num_seqs = int(inputs.num_seqs[0])
        n_rows = int(inputs.cu_q_lens[num_seqs])
        self._kv[inputs.slot_mapping[:n_rows]] = inputs.token_ids[:n_rows]
        sampled = np.zeros(S, np.int32)
        sp = inputs.sampling
        for s in range(num_seqs):
            kv_len = int(inputs.kv_lens[s])
            pos = np.arange(kv_len)
            pages = inputs.page_table[s, pos // L]
            if (pages == 0).any():
                raise RuntimeError(f"sequence {s} reads the padding page 0")
            ctx = self._kv[pages * L + pos % L]
            if (ctx < 0).any():
                raise RuntimeError(f"sequence {s} reads KV slots that were never written")
            if int(inputs.cu_q_lens[s + 1]) == int(inputs.cu_q_lens[s]):
                # A real model has no row of its own to sample from (its logits row would be
                # another sequence's), e.g. after a prefix hit that covered the whole prompt.
                raise RuntimeError(f"sequence {s} has no new tokens in the step")
            if int(inputs.logits_indices[s]) != int(inputs.cu_q_lens[s + 1]) - 1:
                raise RuntimeError(f"sequence {s}: logits index is not its last row")
            if sp is not None and float(sp.temperature[s]) > 0:
                sampled[s] = mock_sampled_token(int(sp.seeds[s]), int(sp.output_positions[s]),
                                                self.vocab_size)
            else:
                sampled[s] = mock_next_token(ctx, self.vocab_size)
        if num_logprobs is None:
            return RunnerOutput(sampled)
        lp = -(sampled % 7).astype(np.float32) / 8
        k = np.arange(num_logprobs)
        top_ids = ((sampled[:, None] + k) % self.vocab_size).astype(np.int32)
        return RunnerOutput(sampled, lp, top_ids, (lp[:, None] - k).astype(np.float32))
