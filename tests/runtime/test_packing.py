"""packing: one int32 vector per step round-trips every StepInputs leaf exactly."""

import dataclasses

import jax
import numpy as np
import pytest

from xlaserve.runtime import packing
from xlaserve.runtime.batch import StepInputs
from xlaserve.runtime.model_runner import greedy_sampling_inputs


def _inputs(rng: np.random.Generator, t: int = 16, s: int = 8, m: int = 5) -> StepInputs:
    i32 = lambda *shape: rng.integers(-5, 1000, shape, dtype=np.int32)  # noqa: E731
    smp = greedy_sampling_inputs(s)
    smp = dataclasses.replace(
        smp, temperature=rng.random(s, np.float32), top_p=rng.random(s, np.float32),
        seeds=rng.integers(0, 2**32, s, dtype=np.uint32),
        min_p=np.array([np.nan, -0.0, np.inf, 1e-30, 0, 0, 0, 0], np.float32),
        prompt_token_ids=i32(s, 3), output_token_ids=i32(s, 3))
    return StepInputs(token_ids=i32(t), positions=i32(t), slot_mapping=i32(t),
                      cu_q_lens=i32(s + 1), kv_lens=i32(s), page_table=i32(s, m),
                      num_seqs=i32(1), logits_indices=i32(s), sampling=smp)


def test_round_trip_is_bit_exact_under_jit():
    inputs = _inputs(np.random.default_rng(0))
    spec = packing.spec_of(inputs)
    packed, separate = packing.pack(inputs, spec)
    assert packed.dtype == np.int32 and packed.ndim == 1
    assert len(separate) == 2  # the penalty histories stay separate
    out = jax.jit(lambda p, sep: packing.unpack(p, sep, spec))(packed, separate)
    want = jax.tree_util.tree_leaves_with_path(inputs)
    got = jax.tree_util.tree_leaves(out)
    assert len(got) == len(want)
    for (path, w), g in zip(want, got, strict=True):
        g = np.asarray(g)
        assert g.dtype == w.dtype and g.shape == w.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8),
                                      err_msg=jax.tree_util.keystr(path))


def test_spec_is_hashable_and_equal_for_equal_shapes():
    a = packing.spec_of(_inputs(np.random.default_rng(1)))
    b = packing.spec_of(_inputs(np.random.default_rng(2)))
    assert a == b and hash(a) == hash(b)
    c = packing.spec_of(_inputs(np.random.default_rng(1), t=32))
    assert c != a


def test_pack_rejects_a_leaf_of_another_shape_or_dtype():
    inputs = _inputs(np.random.default_rng(3))
    spec = packing.spec_of(inputs)
    bad = dataclasses.replace(inputs, positions=np.zeros(16, np.int64))
    with pytest.raises(ValueError, match="does not match the pack spec"):
        packing.pack(bad, spec)
    with pytest.raises(ValueError, match="positions.dtype=int64"):
        packing.spec_of(bad)
