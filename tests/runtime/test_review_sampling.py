"""Review tests of the top-k / top-p / min-p filters against a float64 reference (edge cases).

The reference follows the documented semantics of runtime/sampling.py: temperature, then top-k,
then top-p over the renormalized top-k (the token that crosses p is kept; at least one token),
then min-p; every filter is a threshold on the logit, so tokens tied with the last kept token
are kept too.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from xlaserve.runtime import sampling as smp
from xlaserve.runtime.batch import SamplingInputs
from xlaserve.runtime.model_runner import greedy_sampling_inputs

filtered_logits = jax.jit(smp.filtered_logits, static_argnames="sort")


def make_inputs(temperature, top_k, top_p, min_p) -> SamplingInputs:
    """SamplingInputs with per-row filter controls and everything else off."""
    return dataclasses.replace(
        greedy_sampling_inputs(len(temperature)),
        temperature=np.asarray(temperature, np.float32), top_k=np.asarray(top_k, np.int32),
        top_p=np.asarray(top_p, np.float32), min_p=np.asarray(min_p, np.float32))


def ref_keep(logits: np.ndarray, t: float, k: int, p: float, min_p: float) -> np.ndarray:
    """float64: which tokens the filters keep (bool[V])."""
    x = logits.astype(np.float64) / t
    v = x.shape[0]
    desc = np.sort(x)[::-1]
    kk = v if k <= 0 or k >= v else k
    keep = x >= desc[kk - 1]  # top-k, ties with the k-th value kept
    if p < 1.0:
        top = desc[:kk]
        probs = np.exp(top - top[0])
        probs /= probs.sum()
        before = np.cumsum(probs) - probs  # mass of the better tokens
        n = max(1, int(np.sum(before < p)))  # the token that crosses p is kept
        keep &= x >= desc[n - 1]
    if min_p > 0:
        keep &= x >= x.max() + np.log(min_p)
    return keep


# (temperature, top_k, top_p, min_p)
EDGE_CASES = [
    (1.0, 0, 1.0, 0.0),  # everything off
    (0.5, 0, 1.0, 0.0),  # p = 1 with a peaked distribution: still every token
    (0.5, 40, 1.0, 0.0),  # top-k alone (p = 1): exactly the top 40 (+ ties)
    (1.0, 256, 1.0, 0.0),  # k = V
    (1.0, 10_000, 0.9, 0.0),  # k > V
    (1.0, 7, 1.0, 0.0),  # the 7th value is tied (quantized logits below)
    (1.0, 0, 1e-7, 0.0),  # tiny p: the best token (and its ties) only
    (0.8, 0, 0.6, 0.0),  # the token crossing p is kept
    (1.3, 20, 0.95, 0.0),  # top-p over the renormalized top-k
    (1.0, 0, 1.0, 0.3),  # min-p alone
    (0.7, 50, 0.9, 0.05),  # all three
]


@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
def test_filters_keep_the_reference_set(case):
    """Each edge case, alone in its row, in a batch that sorts (another row uses top-p) and in
    the cond-based path, keeps exactly the reference set."""
    t, k, p, mp = case
    rng = np.random.default_rng(0)
    v = 256
    row = np.round(rng.standard_normal(v) * 4.0) / 2.0  # half-integer steps: many ties
    logits = np.stack([row, rng.standard_normal(v)]).astype(np.float32)
    want = ref_keep(logits[0], t, k, p, mp)
    inputs = make_inputs([t, 1.0], [k, 0], [p, 0.5], [mp, 0.0])  # row 1 forces the sort
    for sort in (True, None):
        got = np.isfinite(np.asarray(filtered_logits(logits, inputs, sort=sort))[0])
        np.testing.assert_array_equal(got, want, err_msg=f"sort={sort}: kept {got.sum()} "
                                      f"tokens, want {want.sum()}")


def test_top_p_one_is_a_noop_whatever_the_batch_mates():
    """A request with top_p = 1 (and no top-k) samples from the same distribution whether or
    not a batch-mate's top-p makes the sampler sort: p = 1 removes no token (float32 cumsum
    rounding used to drop the tail of peaked rows)."""
    logits = np.linspace(-8.0, 8.0, 257).astype(np.float32)
    np.random.default_rng(0).shuffle(logits)
    alone = np.asarray(filtered_logits(logits[None], make_inputs([0.5], [0], [1.0], [0.0]),
                                       sort=False))[0]
    assert np.isfinite(alone).all()
    mates = make_inputs([0.5, 1.0], [0, 0], [1.0, 0.5], [0.0, 0.0])
    for sort in (True, None):
        batched = np.asarray(filtered_logits(np.stack([logits, logits]), mates, sort=sort))[0]
        np.testing.assert_array_equal(batched, alone, err_msg=f"sort={sort}")
