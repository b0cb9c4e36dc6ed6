"""Tests of the ModelRunner over a tiny random-init Llama (CPU, float32, small buckets)."""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cc

from xlaserve.runtime import model_runner as mr
from xlaserve.runtime.batch import StepInputs
from xlaserve.runtime.config import CacheConfig, ModelConfig, SchedulerConfig
from xlaserve.runtime.models import llama

CFG = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  max_position_embeddings=256, dtype="float32")
CACHE = CacheConfig(page_size=8, num_pages=40)
SCHED = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8, max_model_len=64)
_JAX_KEYS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
             "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="module")
def params():
    """Random weights in the shapes of llama.abstract_params (llama.init_params is much slower
    on CPU: it traces the whole model). Normal(0.08) matrices so greedy tokens are well
    separated (no near-ties); unit norm scales."""
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda a: jax.numpy.asarray(rng.normal(0.0, 0.08, a.shape).astype(a.dtype) if a.ndim > 1
                                    else np.ones(a.shape, a.dtype)),
        llama.abstract_params(CFG))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    saved = {k: getattr(jax.config, k) for k in _JAX_KEYS}
    yield str(tmp_path_factory.mktemp("jax_cache"))
    for k, v in saved.items():
        jax.config.update(k, v)
    jax_cc.reset_cache()


@pytest.fixture(scope="module")
def runner(params, cache_dir):
    r = mr.ModelRunner(CFG, params, CACHE, SCHED, attention_impl="reference",
                       compilation_cache_dir=cache_dir)
    r.warmup()
    return r


def build_step(seqs, runner, sampling=None, num_tokens=None) -> StepInputs:
    """A minimal batch builder. seqs: list of (new token ids, tokens already cached, page ids)."""
    total = sum(len(toks) for toks, _, _ in seqs)
    t = num_tokens or mr.choose_bucket(total, runner.token_buckets)
    s = mr.choose_bucket(len(seqs), runner.seq_buckets)
    L = runner.page_size
    token_ids, positions, slots = (np.zeros(t, np.int32) for _ in range(3))
    cu = np.zeros(s + 1, np.int32)
    kv_lens = np.zeros(s, np.int32)
    table = np.zeros((s, runner.max_pages_per_seq), np.int32)
    logits_idx = np.zeros(s, np.int32)
    row = 0
    for i, (toks, start, pages) in enumerate(seqs):
        for j, tok in enumerate(toks):
            pos = start + j
            token_ids[row], positions[row] = tok, pos
            slots[row] = pages[pos // L] * L + pos % L
            row += 1
        kv_lens[i] = start + len(toks)
        table[i, :len(pages)] = pages
        logits_idx[i] = row - 1
        cu[i + 1] = row
    cu[len(seqs) + 1:] = row
    return StepInputs(token_ids=token_ids, positions=positions, slot_mapping=slots,
                      cu_q_lens=cu, kv_lens=kv_lens, page_table=table,
                      num_seqs=np.array([len(seqs)], np.int32), logits_indices=logits_idx,
                      sampling=sampling)


@functools.lru_cache(maxsize=None)
def _direct_forward():
    return jax.jit(functools.partial(llama.forward, cfg=CFG, attention_impl="reference"))


def direct_logits(params, inputs: StepInputs) -> np.ndarray:
    """Forward on a fresh cache, no runner: f32[S, V]."""
    cache = llama.init_kv_cache(CFG, CACHE.num_pages, CACHE.page_size)
    logits, _ = _direct_forward()(params, inputs, cache)
    return np.asarray(logits)


def test_choose_bucket():
    assert mr.choose_bucket(1, (16, 32)) == 16
    assert mr.choose_bucket(16, (16, 32)) == 16
    assert mr.choose_bucket(17, (16, 32)) == 32
    with pytest.raises(ValueError, match="n=33"):
        mr.choose_bucket(33, (16, 32))


def test_attributes_and_warmup_compiles_all_buckets(runner):
    assert runner.num_pages == 40 and runner.page_size == 8
    assert runner.max_pages_per_seq == 8
    assert runner.token_buckets == (16, 32) and runner.seq_buckets == (8,)
    assert set(runner.compile_records) == {(16, 8), (32, 8)}
    assert runner.history_widths == (SCHED.max_model_len,)  # one program per bucket
    rec = runner.compile_records[(32, 8)]
    assert rec.compile_s > 0 and rec.cache_hit is False
    assert rec.compiled.cost_analysis() is not None
    assert runner.compiles_after_warmup == 0


def test_greedy_matches_direct_forward_and_logprobs(runner, params):
    rng = np.random.default_rng(0)
    p0, p1 = rng.integers(0, 256, 5).tolist(), rng.integers(0, 256, 11).tolist()
    inputs = build_step([(p0, 0, [1]), (p1, 0, [2, 3])], runner)
    want = direct_logits(params, inputs)
    out = runner.execute(inputs, num_logprobs=5)
    np.testing.assert_array_equal(out.sampled_token_ids[:2], np.argmax(want[:2], axis=-1))
    assert out.sampled_token_ids.shape == (8,)
    lsm = np.asarray(jax.nn.log_softmax(want, axis=-1))
    np.testing.assert_allclose(out.logprobs[:2], lsm[:2].max(axis=-1), atol=1e-5)
    np.testing.assert_array_equal(out.top_logprob_ids[:2], np.argsort(-lsm[:2])[:, :5])
    assert out.top_logprobs.shape == (8, 5)
    assert runner.execute(inputs).logprobs is None  # not asked: not copied
    # Two steps in flight before either result is read (host runs ahead of the device).
    other = build_step([(p1[:3], 0, [12])], runner)
    first, second = runner.execute_async(inputs), runner.execute_async(other)
    np.testing.assert_array_equal(second.result().sampled_token_ids[:1],
                                  np.argmax(direct_logits(params, other)[:1], axis=-1))
    np.testing.assert_array_equal(first.result().sampled_token_ids, out.sampled_token_ids)


def test_multi_step_decode_uses_cache_in_place(runner, params):
    """Prefill then greedy decode through the runner equals recomputing each prefix."""
    before = runner.compiles_after_warmup
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 256, 6).tolist(), rng.integers(0, 256, 9).tolist()]
    pages = [[4, 5], [6, 7]]
    out = runner.execute(build_step([(s, 0, pg) for s, pg in zip(seqs, pages)], runner))
    for _ in range(4):
        for i in range(2):
            seqs[i].append(int(out.sampled_token_ids[i]))
        old_cache = runner.kv_cache
        out = runner.execute_async(build_step(
            [(s[-1:], len(s) - 1, pg) for s, pg in zip(seqs, pages)], runner)).result()
        assert all(a.is_deleted() for a in jax.tree.leaves(old_cache)), "cache was copied"
        for i in range(2):  # the whole prefix from scratch, no cache reuse
            full = build_step([(seqs[i], 0, [9, 10])], runner)
            assert int(out.sampled_token_ids[i]) == int(np.argmax(direct_logits(params, full)[0]))
    assert runner.compiles_after_warmup == before


def test_chained_steps_take_placeholder_tokens_from_the_previous_output(runner, params):
    """Decode steps dispatched before the previous step's tokens reach the host (each row points
    at a row of the previous output, in a different order) give the greedy continuation."""
    rng = np.random.default_rng(7)
    seqs = [rng.integers(0, 256, 5).tolist(), rng.integers(0, 256, 7).tolist()]
    pages = [[11, 12], [13, 14]]
    prev = runner.execute_async(build_step([(s, 0, pg) for s, pg in zip(seqs, pages)], runner))
    prev_order = [0, 1]  # prev's row r holds sequence prev_order[r]
    for order in ([1, 0], [0, 1], [1, 0]):
        # Row r of this step is sequence order[r]; its token is still unknown on the host (0).
        step = build_step([([0], len(seqs[i]), pages[i]) for i in order], runner)
        index = np.full(step.num_tokens_bucket, -1, np.int32)
        index[:2] = [prev_order.index(i) for i in order]
        nxt = runner.execute_async(dataclasses.replace(step, prev_sampled_index=index),
                                   prev=prev)
        got = prev.result().sampled_token_ids
        for r, i in enumerate(prev_order):
            seqs[i].append(int(got[r]))
        prev, prev_order = nxt, order
    got = prev.result().sampled_token_ids
    for r, i in enumerate(prev_order):  # the last step's tokens, checked from scratch
        full = build_step([(seqs[i], 0, [9, 10])], runner)
        assert int(got[r]) == int(np.argmax(direct_logits(params, full)[0]))
    with pytest.raises(ValueError, match="pass prev"):
        runner.execute_async(dataclasses.replace(step, prev_sampled_index=index))


def test_hlo_aliases_the_cache(runner):
    text = runner.compile_records[(16, 8)].compiled.as_text()
    assert "input_output_alias" in text
    num_aliased = text.split("input_output_alias=")[1].split("\n")[0].count("may-alias")
    assert num_aliased >= 2 * CFG.num_layers, text.split("\n")[0]


def test_no_compiles_after_warmup_over_varied_inputs(runner):
    before = runner.compiles_after_warmup
    rng = np.random.default_rng(2)
    for step in range(6):
        n = int(rng.integers(1, 5))
        lens = rng.integers(1, 7, n)
        seqs = [(rng.integers(0, 256, k).tolist(), 0, [11 + 2 * i, 12 + 2 * i])
                for i, k in enumerate(lens)]
        smp = mr.greedy_sampling_inputs(8)
        smp = dataclasses.replace(
            smp, temperature=rng.uniform(0, 1.5, 8).astype(np.float32),
            top_k=rng.integers(0, 20, 8).astype(np.int32),
            top_p=rng.uniform(0.5, 1.0, 8).astype(np.float32),
            seeds=rng.integers(0, 2**31, 8).astype(np.uint32))
        if step % 2:  # penalty history of an arbitrary width: padded to the warmed-up width
            w = int(rng.integers(2, 30))
            smp = dataclasses.replace(
                smp, repetition_penalty=np.full(8, 1.3, np.float32),
                prompt_token_ids=rng.integers(-1, 256, (8, w)).astype(np.int32),
                output_token_ids=rng.integers(-1, 256, (8, w + 3)).astype(np.int32))
        out = runner.execute(build_step(seqs, runner, sampling=smp),
                             num_logprobs=int(rng.integers(0, 21)) if step % 3 else None)
        assert out.sampled_token_ids.dtype == np.int32
    assert runner.compiles_after_warmup == before, runner.compile_log


def test_histories_of_different_widths_are_padded_without_compiling(runner):
    """A full-width prompt history with a narrower output history is padded to the warmed-up
    width (it used to skip the padding and compile a new program for the narrow width)."""
    w = runner.history_width
    seq = [([5, 6, 7, 8], 0, [11])]
    prompt = np.full((8, w), -1, np.int32)
    prompt[0, :4] = [5, 6, 7, 8]
    output = np.full((8, 2), -1, np.int32)
    output[0, 0] = 9
    smp = dataclasses.replace(mr.greedy_sampling_inputs(8),
                              repetition_penalty=np.full(8, 1.5, np.float32),
                              frequency_penalty=np.full(8, 0.5, np.float32),
                              prompt_token_ids=prompt, output_token_ids=output)
    before = runner.compiles_after_warmup
    got = runner.execute(build_step(seq, runner, sampling=smp), num_logprobs=0)
    assert runner.compiles_after_warmup == before, runner.compile_log
    full = np.full((8, w), -1, np.int32)
    full[:, :2] = output
    want = runner.execute(build_step(seq, runner, sampling=dataclasses.replace(
        smp, output_token_ids=full)), num_logprobs=0)
    np.testing.assert_array_equal(got.sampled_token_ids, want.sampled_token_ids)


def test_sampled_token_independent_of_batch_mates(runner):
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, 256, 7).tolist()
    other = rng.integers(0, 256, 5).tolist()

    def run(seq_list, row):
        smp = mr.greedy_sampling_inputs(8)
        temp = np.full(8, 0.8, np.float32)
        seeds = rng.integers(0, 2**31, 8).astype(np.uint32)
        seeds[row] = 77
        pos = np.zeros(8, np.int32)
        pos[row] = 4
        smp = dataclasses.replace(smp, temperature=temp, seeds=seeds, output_positions=pos)
        return int(runner.execute(build_step(seq_list, runner, sampling=smp))
                   .sampled_token_ids[row])

    alone = run([(prompt, 0, [20])], 0)
    second = run([(other, 0, [21]), (prompt, 0, [22])], 1)
    assert alone == second


def test_out_of_bucket_shape_is_counted_and_logged(runner, caplog):
    before = runner.compiles_after_warmup
    inputs = build_step([([1, 2, 3], 0, [1])], runner, num_tokens=24)  # 24 is no bucket
    with caplog.at_level(logging.ERROR):
        out = runner.execute(inputs)
    assert out.sampled_token_ids.shape == (8,)
    assert runner.compiles_after_warmup >= before + 1
    assert "token_ids[24]" in runner.compile_log[-1].shapes
    assert any("after warm-up" in rec.message and "token_ids[24]" in rec.message
               for rec in caplog.records)


def test_subset_warmup_and_penalties_off(params, cache_dir):
    r = mr.ModelRunner(CFG, params, CACHE, SCHED, attention_impl="reference",
                       compilation_cache_dir=cache_dir, enable_penalties=False)
    with pytest.raises(ValueError, match="buckets"):
        r.warmup(buckets=[(24, 8)])
    hist = dataclasses.replace(mr.greedy_sampling_inputs(8),
                               output_token_ids=np.full((8, 4), -1, np.int32))
    with pytest.raises(ValueError, match="enable_penalties"):
        r.execute(build_step([([1], 0, [1])], r, sampling=hist))
    assert r.history_widths == (1,)


def test_second_runner_hits_persistent_cache(runner, params, cache_dir):
    seen = []
    r2 = mr.ModelRunner(CFG, params, CACHE, SCHED, attention_impl="reference",
                        compilation_cache_dir=cache_dir)
    r2.warmup(progress=lambda done, total, key, rec: seen.append((done, total, key)))
    assert [d for d, _, _ in seen] == [1, 2] and seen[-1][1] == 2
    records = list(r2.compile_records.values())
    assert all(rec.cache_hit is True for rec in records), [rec.cache_hit for rec in records]


def test_input_validation(runner):
    bad = build_step([([1], 0, [1])], runner)
    bad = dataclasses.replace(bad, page_table=np.zeros((8, 3), np.int32))
    with pytest.raises(ValueError, match="page_table"):
        runner.execute(bad)
    with pytest.raises(ValueError, match="num_logprobs"):
        runner.execute(build_step([([1], 0, [1])], runner), num_logprobs=21)


def test_num_pages_default_on_cpu(params, cache_dir):
    r = mr.ModelRunner(CFG, params, CacheConfig(page_size=8), SCHED, attention_impl="reference",
                       compilation_cache_dir=cache_dir)
    assert r.num_pages == SCHED.max_num_seqs * r.max_pages_per_seq + 1
    assert r.kv_cache[0][0].shape == (2, r.num_pages, 8, 16)


def test_dtype_contract_is_enforced(runner):
    inputs = build_step([([1, 2], 0, [1])], runner)
    bad = dataclasses.replace(inputs, positions=inputs.positions.astype(np.int64))
    with pytest.raises(ValueError, match="positions.dtype=int64"):
        runner.execute(bad)
    smp = dataclasses.replace(mr.greedy_sampling_inputs(8), seeds=np.zeros(8, np.int64))
    with pytest.raises(ValueError, match="seeds.dtype=int64"):
        runner.execute(dataclasses.replace(inputs, sampling=smp))


def _assert_two_seqs_greedy(r: mr.ModelRunner, params, *, seed: int) -> None:
    """Warms up one bucket, prefills two random prompts: greedy tokens as the direct forward."""
    r.warmup(buckets=[(16, 8)])
    rng = np.random.default_rng(seed)
    inputs = build_step([(rng.integers(0, 256, 4).tolist(), 0, [1]),
                         (rng.integers(0, 256, 9).tolist(), 0, [2, 3])], r)
    out = r.execute(inputs)
    want = np.argmax(direct_logits(params, inputs)[:2], axis=-1)
    np.testing.assert_array_equal(out.sampled_token_ids[:2], want)


@pytest.mark.slow  # a third compile of the step; the sharding tests cover the sharded forward
def test_sharded_runner_matches_unsharded(params, cache_dir):
    """Explicit in/out shardings on a 1x2 mesh: KV pages split over KV heads, same tokens."""
    mesh = jax.make_mesh((1, 2), ("data", "model"), devices=jax.devices()[:2])
    kv = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))
    r = mr.ModelRunner(CFG, params, CACHE, SCHED, attention_impl="reference",
                       compilation_cache_dir=cache_dir, mesh=mesh, kv_sharding=kv,
                       enable_penalties=False)
    assert r.kv_cache[0][0].sharding.is_equivalent_to(kv, 4)
    _assert_two_seqs_greedy(r, params, seed=4)
    assert r.kv_cache[0][0].sharding.is_equivalent_to(kv, 4)  # out_shardings kept it split
    assert r.compiles_after_warmup == 0
    with pytest.raises(ValueError, match="mesh=None"):
        mr.ModelRunner(CFG, params, CACHE, SCHED, kv_sharding=kv,
                       compilation_cache_dir=cache_dir)


def test_runner_at_tp_above_kv_heads_stores_one_head_per_device(params, cache_dir,
                                                                 monkeypatch):
    """tp 4 > K 2 through a ShardingPlan: each device stores only the KV head it reads, so the
    page budget per device fits twice the pages of one device's [K, P, L, H]; same tokens."""
    from xlaserve.runtime.config import ParallelConfig
    from xlaserve.sharding.specs import ShardingPlan

    plan = ShardingPlan.create(CFG, ParallelConfig(tensor_parallel_size=4),
                               attention_impl="reference")
    assert plan.kv_cache_heads == 4
    # 2 layers x (K, V) x 16 x 4 B = 256 B per token per stored head; pages of 8 tokens.
    monkeypatch.setattr(mr, "CPU_DEFAULT_KV_BYTES", 10 * 8 * 512)  # 10 one-device pages
    auto = CacheConfig(page_size=8)
    one = mr.ModelRunner(CFG, params, auto, SCHED, attention_impl="reference",
                         compilation_cache_dir=cache_dir, enable_penalties=False)
    r = mr.ModelRunner(CFG, params, auto, SCHED, attention_impl="reference",
                       compilation_cache_dir=cache_dir, mesh=plan.mesh,
                       param_shardings=plan.param_shardings, kv_sharding=plan.kv_sharding,
                       kv_cache_heads=plan.kv_cache_heads, attention_fn=plan.attention_fn,
                       enable_penalties=False)
    assert (one.num_pages, r.num_pages) == (10, 20)
    k_pages = r.kv_cache[0][0]
    assert k_pages.shape == (4, 20, 8, 16)
    assert k_pages.addressable_shards[0].data.shape == (1, 20, 8, 16)
    _assert_two_seqs_greedy(r, params, seed=5)
    assert r.compiles_after_warmup == 0
    # Without kv_cache_heads the runner takes the ShardedAttention's; a different one is refused.
    kw = dict(attention_impl="reference", compilation_cache_dir=cache_dir, mesh=plan.mesh,
              param_shardings=plan.param_shardings, kv_sharding=plan.kv_sharding,
              attention_fn=plan.attention_fn, enable_penalties=False)
    derived = mr.ModelRunner(CFG, params, CACHE, SCHED, **kw)
    assert derived.kv_cache_heads == 4 and derived.kv_cache[0][0].shape[0] == 4
    with pytest.raises(ValueError, match="kv_cache_heads=2: the attention_fn reads caches of 4"):
        mr.ModelRunner(CFG, params, CACHE, SCHED, kv_cache_heads=2, **kw)


def test_num_pages_from_memory():
    # 80 GiB x 0.9 - 16 GiB of weights, 1 MiB pages.
    assert mr.num_pages_from_memory(80 << 30, 16 << 30, 0.9, 1 << 20) == int(
        ((80 << 30) * 0.9 - (16 << 30)) // (1 << 20))
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.5"):
        mr.num_pages_from_memory(100, 49, 0.5, 1)


def test_custom_buckets_and_bucket_keys(params, cache_dir):
    r = mr.ModelRunner(CFG, params, CACHE, SCHED, compilation_cache_dir=cache_dir,
                       token_buckets=(1, 4, 32), seq_buckets=(2, 8))
    assert r.token_buckets == (1, 4, 32) and r.seq_buckets == (2, 8)
    # T=1 holds one sequence (S bucket 2); T=4 up to 4 sequences (S buckets 2 and 8).
    assert r.bucket_keys() == [(1, 2), (4, 2), (4, 8), (32, 2), (32, 8)]
    for bad in ((32, 4), (4, 4, 32), (0, 32), ()):
        with pytest.raises(ValueError, match="token_buckets"):
            mr.ModelRunner(CFG, params, CACHE, SCHED, compilation_cache_dir=cache_dir,
                           token_buckets=bad)
    with pytest.raises(ValueError, match="seq_buckets"):
        mr.ModelRunner(CFG, params, CACHE, SCHED, compilation_cache_dir=cache_dir,
                       seq_buckets=(2, 4))


def test_attention_fn_is_used(params, cache_dir):
    calls = []

    def attention_fn(q, k_new, v_new, k_pages, v_pages, inputs, *, sm_scale, sliding_window):
        calls.append(q.shape)
        return llama.paged_attention(q, k_new, v_new, k_pages, v_pages, inputs,
                                     sm_scale=sm_scale, sliding_window=sliding_window,
                                     impl="reference")

    r = mr.ModelRunner(CFG, params, CACHE, SCHED, compilation_cache_dir=cache_dir,
                       attention_fn=attention_fn, enable_penalties=False)
    jax.eval_shape(r.jitted_step, r.params, r.kv_cache, r.abstract_inputs(16, 8))
    assert calls == [(16, CFG.num_heads, CFG.head_dim)] * CFG.num_layers


def test_step_programs_have_no_conditionals(runner):
    """No lax.cond in any program a step runs: a cond on a device predicate makes the host wait
    at dispatch, which would stall the chained (dispatch-ahead) engine loop."""
    assert runner.compile_records and runner._sampler_executables
    for key, rec in runner.compile_records.items():
        assert " conditional(" not in rec.compiled.as_text(), key
    for key, compiled in runner._sampler_executables.items():
        assert " conditional(" not in compiled.as_text(), key
    # The cond-based sampler does contain one (the check above can fail).
    smp = runner.dummy_inputs(16, 8).sampling
    text = jax.jit(mr.sampling.sample).lower(np.zeros((8, CFG.vocab_size), np.float32),
                                             smp).compile().as_text()
    assert " conditional(" in text


def test_logit_bias_rows_take_the_sampler_program(runner, params):
    """A batch with logit_bias runs the sampler with the bias (+100 forces a token, -100 bans
    the argmax); rows without one keep their greedy tokens; nothing compiles after warm-up."""
    from xlaserve.runtime.batch import MAX_LOGIT_BIAS

    rng = np.random.default_rng(6)
    inputs = build_step([(rng.integers(0, 256, 4).tolist(), 0, [1]),
                         (rng.integers(0, 256, 9).tolist(), 0, [2, 3]),
                         (rng.integers(0, 256, 3).tolist(), 0, [4])], runner)
    logits = direct_logits(params, inputs)[:3]
    ids = np.full((8, MAX_LOGIT_BIAS), -1, np.int32)
    vals = np.zeros((8, MAX_LOGIT_BIAS), np.float32)
    ids[0, 0], vals[0, 0] = 200, 100.0
    ids[1, 0], vals[1, 0] = int(np.argmax(logits[1])), -100.0
    smp = dataclasses.replace(mr.greedy_sampling_inputs(8), logit_bias_ids=ids, logit_bias=vals)
    before = runner.compiles_after_warmup
    out = runner.execute(dataclasses.replace(inputs, sampling=smp))
    assert out.sampled_token_ids[0] == 200
    assert out.sampled_token_ids[1] == np.argsort(logits[1])[-2]
    assert out.sampled_token_ids[2] == np.argmax(logits[2])
    assert runner.compiles_after_warmup == before  # no new program for the bias
    bad = dataclasses.replace(smp, logit_bias=vals[:, :10])
    with pytest.raises(ValueError, match="inputs.sampling.logit_bias: float32"):
        runner.execute(dataclasses.replace(inputs, sampling=bad))
    half = dataclasses.replace(smp, logit_bias=None)
    with pytest.raises(ValueError, match="logit_bias_ids, logit_bias: give both or neither"):
        runner.execute(dataclasses.replace(inputs, sampling=half))


def test_num_pages_without_memory_stats_warns_off_cpu(caplog):
    # 1 GiB cap over 2 MiB pages = 512; a smaller full need wins.
    with caplog.at_level(logging.INFO, logger=mr.__name__):
        assert mr.num_pages_without_memory_stats("cpu", 10**6, 2 << 20) == 512
        assert mr.num_pages_without_memory_stats("cpu", 7, 2 << 20) == 7
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=mr.__name__):
        assert mr.num_pages_without_memory_stats("gpu", 10**6, 2 << 20) == 512
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "--num-pages" in warned[0] and "gpu" in warned[0]


def test_kv_memory_source_allocator_then_driver():
    def never():
        raise AssertionError("the driver is asked only when the allocator has no limit")

    stats = {"bytes_limit": 100 << 30, "bytes_in_use": 20 << 30}
    assert mr.kv_memory_source("gpu", stats, never) == (100 << 30, 20 << 30, "allocator")
    assert mr.kv_memory_source("cpu", None, never) is None
    # XLA's VMM / platform allocators: no stats, so the driver's (free, total) decide, capped
    # at the allocators' fraction of the total.
    assert mr.kv_memory_source("gpu", None, lambda: (30 << 30, 140 << 30)) == (
        105 << 30, 110 << 30, "driver, 0.75 of the total")
    assert mr.kv_memory_source("gpu", {}, lambda: (30 << 30, 140 << 30), 0.5)[:2] == (
        70 << 30, 110 << 30)
    assert mr.kv_memory_source("gpu", None, lambda: None) is None


def test_cuda_memory_info_without_a_driver(monkeypatch):
    import ctypes

    from xlaserve.runtime import hardware

    def no_driver(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_driver)
    assert hardware.cuda_memory_info(0) is None


class _FakeDriver:
    """The libcuda calls of hardware.primary_contexts / pushed / cuda_memory_info, recorded;
    `fail` names the one that returns a CUDA error (1)."""

    def __init__(self, fail: str = "") -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail = fail

    def _rc(self, name: str, arg: int = -1) -> int:
        self.calls.append((name, arg))
        return 1 if name == self.fail else 0

    def cuDevicePrimaryCtxRetain(self, ctx, ordinal):  # noqa: N802  (the driver's names)
        return self._rc("retain", ordinal)

    def cuDevicePrimaryCtxRelease_v2(self, ordinal):  # noqa: N802
        return self._rc("release", ordinal)

    def cuCtxPushCurrent_v2(self, ctx):  # noqa: N802
        return self._rc("push")

    def cuCtxPopCurrent_v2(self, ctx):  # noqa: N802
        return self._rc("pop")

    def cuMemGetInfo_v2(self, free, total):  # noqa: N802
        free._obj.value, total._obj.value = 3 << 30, 8 << 30
        return self._rc("meminfo")


def test_cuda_memory_info_pairs_the_driver_calls():
    from xlaserve.runtime import hardware

    ok = _FakeDriver()
    assert hardware.cuda_memory_info(2, ok) == (3 << 30, 8 << 30)
    assert ok.calls == [("retain", 2), ("push", -1), ("meminfo", -1), ("pop", -1),
                        ("release", 2)]
    # a failing call gives None, and whatever was retained / pushed is released / popped
    for fail, expect in (("retain", [("retain", 2)]),
                         ("push", [("retain", 2), ("push", -1), ("release", 2)]),
                         ("meminfo", ok.calls)):
        drv = _FakeDriver(fail)
        assert hardware.cuda_memory_info(2, drv) is None, fail
        assert drv.calls == expect, fail


def test_primary_contexts_release_what_they_retained():
    from xlaserve.runtime import hardware

    drv = _FakeDriver()
    with pytest.raises(ValueError), hardware.primary_contexts([0, 1], drv) as (_, ctxs):
        assert sorted(ctxs) == [0, 1]
        raise ValueError("the body failed")
    assert drv.calls == [("retain", 0), ("retain", 1), ("release", 0), ("release", 1)]
    drv = _FakeDriver("retain")  # the first retain fails: nothing to release, the device named
    with pytest.raises(RuntimeError, match="device 5"), hardware.primary_contexts([5, 6], drv):
        pass
    assert drv.calls == [("retain", 5)]
