"""StepInputs: the fixed-shape arrays that cross from the host into the jitted step.

Host side (the scheduler) hands a SchedulerOutput to `build`, which pads everything to a shape
bucket (T tokens, S sequences) so that every step reuses one of a few compiled programs. This is
one of the two places where host data meets jax (the other is model_runner.py); the only jax use
here is registering StepInputs as a pytree.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np


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

    @property
    def num_tokens_bucket(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs_bucket(self) -> int:
        return int(self.kv_lens.shape[0])
