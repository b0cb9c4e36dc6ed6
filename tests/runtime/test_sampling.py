"""Tests of on-device sampling against numpy references (runtime/sampling.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.runtime import sampling as smp
from xlaserve.runtime.batch import MAX_MIN_TOKENS_STOP_IDS, SamplingInputs

# Jitted once per shape: op-by-op eager execution of the sampler is much slower on CPU.
sample = jax.jit(smp.sample)
filtered_logits = jax.jit(smp.filtered_logits)
apply_penalties = jax.jit(smp.apply_penalties)


def make_inputs(s: int, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, rep=1.0, pres=0.0,
                freq=0.0, seeds=None, positions=None, prompt=None, output=None) -> SamplingInputs:
    """SamplingInputs for S rows; scalars broadcast, arrays taken as given."""
    def arr(x, dtype):
        return np.broadcast_to(np.asarray(x, dtype), (s,)).copy()
    none_hist = np.full((s, 1), -1, np.int32)
    return SamplingInputs(
        temperature=arr(temperature, np.float32), top_k=arr(top_k, np.int32),
        top_p=arr(top_p, np.float32), min_p=arr(min_p, np.float32),
        repetition_penalty=arr(rep, np.float32), presence_penalty=arr(pres, np.float32),
        frequency_penalty=arr(freq, np.float32),
        seeds=arr(0 if seeds is None else seeds, np.uint32),
        output_positions=arr(0 if positions is None else positions, np.int32),
        prompt_token_ids=none_hist if prompt is None else np.asarray(prompt, np.int32),
        output_token_ids=none_hist if output is None else np.asarray(output, np.int32),
        min_tokens=np.zeros(s, np.int32),
        min_tokens_stop_ids=np.full((s, MAX_MIN_TOKENS_STOP_IDS), -1, np.int32),
        want_top_logprobs=np.ones(1, np.int32))


# ---------------------------------------------------------------- numpy references

def ref_penalties(logits, rep, pres, freq, prompt_ids, output_ids):
    """HF repetition penalty over prompt + output, OpenAI presence/frequency over output."""
    out = logits.astype(np.float64).copy()
    seen = {t for t in list(prompt_ids) + list(output_ids) if t >= 0}
    for t in seen:
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in {t for t in output_ids if t >= 0}:
        count = sum(1 for u in output_ids if u == t)
        out[t] -= freq * count + pres
    return out


def ref_probs(logits, temperature, top_k, top_p, min_p):
    """The distribution sampled from: temperature, top-k, top-p (renormalized), min-p."""
    scaled = logits.astype(np.float64) / temperature
    v = scaled.shape[0]
    order = np.argsort(-scaled, kind="stable")
    keep = np.zeros(v, bool)
    k = v if top_k <= 0 else min(top_k, v)
    top = order[:k]
    p = np.exp(scaled[top] - scaled[top].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    n_keep = max(1, int(np.sum(before < top_p)))
    keep[top[:n_keep]] = True
    if min_p > 0:
        keep &= scaled >= scaled.max() + np.log(min_p)
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    return probs / probs.sum()


# ---------------------------------------------------------------- tests

def test_greedy_is_exact_argmax():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 300)).astype(np.float32) * 3
    out = sample(logits, make_inputs(16, temperature=0.0, top_k=5, top_p=0.5))
    np.testing.assert_array_equal(np.asarray(out.token_ids), np.argmax(logits, axis=-1))


def test_penalties_match_reference():
    rng = np.random.default_rng(1)
    s, v, w = 6, 40, 12
    logits = rng.standard_normal((s, v)).astype(np.float32) * 2
    prompt = rng.integers(-1, v, size=(s, w)).astype(np.int32)
    output = rng.integers(-1, v, size=(s, w)).astype(np.int32)
    output[:, :4] = 7  # repeated tokens exercise the frequency count
    rep = np.array([1.0, 1.3, 0.7, 2.0, 1.0, 1.5], np.float32)
    pres = np.array([0.0, 0.5, -0.5, 1.0, 0.0, 2.0], np.float32)
    freq = np.array([0.0, 0.2, 0.3, -1.0, 0.0, 0.1], np.float32)
    si = make_inputs(s, rep=rep, pres=pres, freq=freq, prompt=prompt, output=output)
    got = np.asarray(apply_penalties(logits, si))
    for r in range(s):
        want = ref_penalties(logits[r], rep[r], pres[r], freq[r], prompt[r], output[r])
        np.testing.assert_allclose(got[r], want, rtol=1e-5, atol=1e-5)


def test_unused_penalty_history_is_a_noop():
    logits = np.random.default_rng(2).standard_normal((4, 50)).astype(np.float32)
    got = np.asarray(apply_penalties(logits, make_inputs(4, rep=1.5, pres=1.0, freq=1.0)))
    np.testing.assert_array_equal(got, logits)


@pytest.mark.parametrize("top_k,top_p,min_p,temperature", [
    (0, 1.0, 0.0, 1.0), (5, 1.0, 0.0, 0.7), (0, 0.6, 0.0, 1.3), (0, 1.0, 0.1, 1.0),
    (10, 0.8, 0.05, 0.5), (1, 1.0, 0.0, 2.0), (64, 0.3, 0.0, 1.0), (3, 0.99, 0.3, 1.0),
])
def test_filters_match_reference(top_k, top_p, min_p, temperature):
    rng = np.random.default_rng(top_k * 7 + int(top_p * 10))
    s, v = 5, 64
    logits = (rng.standard_normal((s, v)) * 2).astype(np.float32)
    si = make_inputs(s, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    got = np.asarray(filtered_logits(logits, si))
    got_probs = np.asarray(jax.nn.softmax(got, axis=-1))
    for r in range(s):
        want = ref_probs(logits[r], temperature, top_k, top_p, min_p)
        np.testing.assert_array_equal(np.isfinite(got[r]), want > 0, err_msg=f"row {r} kept set")
        np.testing.assert_allclose(got_probs[r], want, atol=1e-5)


def test_filters_per_row_params_mix():
    """Each row follows its own controls in one batch (greedy rows are scaled by 1)."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((4, 32)) * 2).astype(np.float32)
    t = np.array([0.0, 0.5, 1.0, 1.5], np.float32)
    k = np.array([0, 3, 0, 8], np.int32)
    p = np.array([1.0, 1.0, 0.5, 0.9], np.float32)
    mp = np.array([0.0, 0.0, 0.0, 0.2], np.float32)
    got = np.asarray(filtered_logits(logits, make_inputs(4, temperature=t, top_k=k,
                                                             top_p=p, min_p=mp)))
    for r in range(4):
        want = ref_probs(logits[r], t[r] if t[r] > 0 else 1.0, k[r], p[r], mp[r])
        np.testing.assert_array_equal(np.isfinite(got[r]), want > 0)


@pytest.mark.parametrize("top_k,top_p,min_p,temperature", [
    (0, 1.0, 0.0, 1.0), (4, 0.9, 0.0, 0.8), (0, 1.0, 0.08, 1.2)])
def test_sampled_distribution_matches_softmax(top_k, top_p, min_p, temperature):
    """Many seeds of one row: token frequencies pass a chi-square bound against the reference."""
    v, n = 12, 20000
    logits_row = np.linspace(-2.0, 1.5, v).astype(np.float32)[::-1].copy()
    np.random.default_rng(4).shuffle(logits_row)
    logits = np.broadcast_to(logits_row, (n, v))
    si = make_inputs(n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     seeds=np.arange(n, dtype=np.uint32), positions=3)
    ids = np.asarray(sample(logits, si).token_ids)
    want = ref_probs(logits_row, temperature, top_k, top_p, min_p)
    counts = np.bincount(ids, minlength=v)
    assert np.all(counts[want == 0] == 0), "sampled a filtered-out token"
    support = want > 0
    expected = want[support] * n
    chi2 = float(np.sum((counts[support] - expected) ** 2 / expected))
    df = int(support.sum()) - 1
    # ~1e-6 tail for these small df; a wrong distribution gives chi2 in the hundreds or more.
    assert chi2 < df + 8 * np.sqrt(2 * max(df, 1)) + 10, (chi2, df, counts, expected)


def test_reproducible_across_rows_and_batch_mates():
    """A request's token depends on its logits, seed and position, not on its row or mates."""
    rng = np.random.default_rng(5)
    v = 100
    target = (rng.standard_normal(v) * 1.5).astype(np.float32)
    for seed in range(8):
        tokens = []
        for s, row in ((1, 0), (8, 5), (16, 11)):
            logits = (rng.standard_normal((s, v)) * 1.5).astype(np.float32)
            logits[row] = target
            temps = rng.uniform(0.0, 2.0, s).astype(np.float32)
            temps[row] = 0.9
            seeds = rng.integers(0, 2**31, s).astype(np.uint32)
            seeds[row] = 1234 + seed
            top_k = rng.integers(0, 10, s).astype(np.int32)
            top_k[row] = 20
            si = make_inputs(s, temperature=temps, top_k=top_k, top_p=0.95, seeds=seeds,
                             positions=rng.integers(0, 50, s).astype(np.int32))
            pos = np.asarray(si.output_positions).copy()
            pos[row] = 17
            si = make_inputs(s, temperature=temps, top_k=top_k, top_p=0.95, seeds=seeds,
                             positions=pos)
            tokens.append(int(np.asarray(sample(logits, si).token_ids)[row]))
        assert len(set(tokens)) == 1, tokens


def test_seed_and_position_change_the_sample():
    v = 1000
    logits = np.zeros((64, v), np.float32)  # uniform: distinct keys give distinct tokens
    by_seed = sample(logits, make_inputs(64, temperature=1.0, seeds=np.arange(64)))
    by_pos = sample(logits, make_inputs(64, temperature=1.0, seeds=7, positions=np.arange(64)))
    assert len(set(np.asarray(by_seed.token_ids).tolist())) > 40
    assert len(set(np.asarray(by_pos.token_ids).tolist())) > 40


def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(6)
    logits = (rng.standard_normal((3, 50)) * 2).astype(np.float32)
    si = make_inputs(3, temperature=np.array([0.0, 1.0, 0.5]), seeds=np.array([1, 2, 3]),
                     rep=1.5, output=np.array([[1, 2], [3, -1], [-1, -1]]))
    out = sample(logits, si)
    lsm = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
    ids = np.asarray(out.token_ids)
    np.testing.assert_allclose(np.asarray(out.logprobs), lsm[np.arange(3), ids], rtol=1e-6)
    assert out.top_logprob_ids.shape == (3, smp.MAX_TOP_LOGPROBS)
    want_ids = np.argsort(-lsm, axis=-1, kind="stable")[:, :smp.MAX_TOP_LOGPROBS]
    np.testing.assert_array_equal(np.asarray(out.top_logprob_ids), want_ids)
    np.testing.assert_allclose(np.asarray(out.top_logprobs),
                               np.take_along_axis(lsm, want_ids, axis=-1), rtol=1e-6)


def test_small_vocab_top_logprobs():
    out = sample(np.zeros((2, 5), np.float32), make_inputs(2))
    assert out.top_logprob_ids.shape == (2, 5)


def test_greedy_with_repetition_penalty_avoids_repeat():
    logits = np.array([[0.0, 3.0, 2.5, 1.0]], np.float32)
    out = sample(logits, make_inputs(1, rep=2.0, output=np.array([[1]])))
    assert int(out.token_ids[0]) == 2  # 3.0 / 2 = 1.5 < 2.5


def test_min_tokens_holds_back_stop_ids_until_reached():
    """Rows under min_tokens never sample their stop ids; at min_tokens they may again."""
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(4, 64)).astype(np.float32)
    top = logits.argmax(-1)
    base = make_inputs(4, temperature=np.array([0.0, 0.0, 0.7, 0.0]), seeds=np.arange(4),
                       positions=np.array([1, 3, 0, 2]))
    stop_ids = np.full((4, MAX_MIN_TOKENS_STOP_IDS), -1, np.int32)
    stop_ids[:, 0] = top
    inputs = dataclasses.replace(base, min_tokens=np.array([3, 3, 5, 0], np.int32),
                                 min_tokens_stop_ids=stop_ids)
    got = np.asarray(jax.jit(smp.sample)(jnp.asarray(logits), inputs).token_ids)
    masked = logits.copy()
    masked[0, top[0]] = -np.inf
    assert got[0] == masked[0].argmax() != top[0]  # position 1 < 3: held back
    assert got[1] == top[1]  # position 3 == min_tokens: allowed again
    assert got[2] != top[2]  # sampled row under its minimum never draws the stop id
    assert got[3] == top[3]  # min_tokens 0: off


def test_top_logprobs_only_computed_when_wanted():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    base = make_inputs(3)
    on = jax.jit(smp.sample)(jnp.asarray(logits), base)
    off = jax.jit(smp.sample)(jnp.asarray(logits),
                              dataclasses.replace(base, want_top_logprobs=np.zeros(1, np.int32)))
    np.testing.assert_allclose(np.asarray(on.top_logprobs[:, 0]), ref.max(-1), rtol=1e-5)
    assert not np.asarray(off.top_logprobs).any()  # skipped
    # The sampled token's logprob is always there.
    np.testing.assert_allclose(np.asarray(off.logprobs), ref.max(-1), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(off.token_ids), logits.argmax(-1))


@pytest.mark.parametrize("mode", smp.SAMPLER_MODES)
def test_static_modes_equal_the_dynamic_sampler_on_batches_they_cover(mode):
    """A SamplerMode program (no lax.cond) gives the cond-based sampler's tokens and logprobs
    on every batch it covers: mixed greedy/sampled rows, penalties with history, min-p, and
    top-k/top-p only when the mode sorts."""
    rng = np.random.default_rng(11)
    s, v = 6, 97
    logits = jnp.asarray(rng.normal(size=(s, v)).astype(np.float32) * 3)
    hist = rng.integers(-1, v, (s, 5)).astype(np.int32)
    inputs = make_inputs(
        s, temperature=[0, 0.7, 1.3, 0, 0.9, 2.0], min_p=[0, 0.05, 0, 0, 0.1, 0],
        rep=[1.0, 1.3, 1.0, 1.5, 1.0, 0.8], pres=[0, 0.5, 0, 0, 0.2, 0], freq=0.1,
        seeds=np.arange(s) + 5, positions=np.arange(s) * 3, prompt=hist, output=hist[:, ::-1],
        top_k=[0, 5, 0, 0, 20, 0] if mode.sort else 0,
        top_p=[1.0, 1.0, 0.8, 1.0, 0.9, 1.0] if mode.sort else 1.0)
    if not mode.top_n:
        inputs = dataclasses.replace(inputs, want_top_logprobs=np.zeros(1, np.int32))
    want = sample(logits, inputs)
    got = jax.jit(smp.sample, static_argnums=2)(logits, inputs, mode)
    for field in ("token_ids", "logprobs", "top_logprob_ids", "top_logprobs"):
        np.testing.assert_allclose(np.asarray(getattr(got, field)),
                                   np.asarray(getattr(want, field)), rtol=1e-6, err_msg=field)
    assert len(set(np.asarray(got.token_ids).tolist())) > 2  # not a degenerate batch


def test_greedy_sampler_equals_sample_for_greedy_rows_without_history():
    rng = np.random.default_rng(12)
    logits = jnp.asarray(rng.normal(size=(5, 64)).astype(np.float32))
    inputs = dataclasses.replace(make_inputs(5, positions=[0, 1, 2, 3, 4]),
                                 min_tokens=np.array([3, 0, 5, 0, 0], np.int32),
                                 want_top_logprobs=np.zeros(1, np.int32))
    stop = np.full((5, MAX_MIN_TOKENS_STOP_IDS), -1, np.int32)
    stop[:, 0] = np.asarray(logits).argmax(-1)  # the argmax is a held-back stop id
    inputs = dataclasses.replace(inputs, min_tokens_stop_ids=stop)
    want = sample(logits, inputs)
    got = jax.jit(smp.greedy)(logits, inputs)
    np.testing.assert_array_equal(np.asarray(got.token_ids), np.asarray(want.token_ids))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=1e-6)
    assert (np.asarray(got.token_ids)[[0, 2]] != stop[[0, 2], 0]).all()  # min_tokens applied


def _bias_arrays(s: int, rows: dict[int, dict[int, float]], width: int = 300):
    ids = np.full((s, width), -1, np.int32)
    vals = np.zeros((s, width), np.float32)
    for r, bias in rows.items():
        for j, (tok, b) in enumerate(sorted(bias.items())):
            ids[r, j], vals[r, j] = tok, b
    return ids, vals


def test_logit_bias_is_added_before_penalties_and_sampling():
    """Each row's bias lands on its own tokens only (ids -1 padded, other rows untouched); +100
    forces a token under greedy and under sampling, -100 bans the argmax; logprobs stay raw."""
    rng = np.random.default_rng(13)
    s, v = 5, 97
    logits = jnp.asarray(rng.normal(size=(s, v)).astype(np.float32) * 3)
    top = np.asarray(logits).argmax(-1)
    rows = {0: {7: 100.0}, 1: {int(top[1]): -100.0}, 2: {3: 0.5, 90: -1.25}, 4: {11: 100.0}}
    ids, vals = _bias_arrays(s, rows)
    inputs = dataclasses.replace(make_inputs(s, temperature=[0, 0, 0, 0, 1.0], seeds=9),
                                 logit_bias_ids=ids, logit_bias=vals)
    want = np.asarray(logits).copy()
    for r, bias in rows.items():
        for tok, b in bias.items():
            want[r, tok] += b
    got = jax.jit(smp.apply_logit_bias)(logits, inputs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    out = sample(logits, inputs)
    tokens = np.asarray(out.token_ids)
    assert tokens[0] == 7 and tokens[4] == 11  # forced, greedy and sampled
    assert tokens[1] == np.argsort(np.asarray(logits)[1])[-2]  # the banned argmax: next best
    assert tokens[2] == want[2].argmax() and tokens[3] == top[3]
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(np.asarray(out.logprobs), raw[np.arange(s), tokens], rtol=1e-5)
    for mode in smp.SAMPLER_MODES:  # the static samplers apply it too
        got_mode = jax.jit(smp.sample, static_argnums=2)(logits, inputs, mode)
        np.testing.assert_array_equal(np.asarray(got_mode.token_ids), tokens)
    np.testing.assert_array_equal(  # no logit_bias arrays: the logits as they were
        np.asarray(jax.jit(smp.apply_logit_bias)(logits, make_inputs(s))), np.asarray(logits))
