"""Scheduler with MockRunner (no model): chunked prefill, decode first, preemption, abort, prefix
hits, page exhaustion, FCFS, and outputs equal to running each request alone."""

from __future__ import annotations

import dataclasses

import pytest

from xlaserve.runtime import batch
from xlaserve.runtime.config import CacheConfig, SchedulerConfig
from xlaserve.runtime.mock_runner import MockRunner, mock_next_token
from xlaserve.runtime.request import Request, SamplingParams

V = 1000
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, seed=1)


def make(budget=16, seqs=8, max_len=128, page=8, pages=64, prefix=True):
    from xlaserve.runtime.scheduler import Scheduler

    sc = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=seqs, max_model_len=max_len)
    cc = CacheConfig(page_size=page, num_pages=pages, enable_prefix_caching=prefix)
    runner = MockRunner(cc, sc, vocab_size=V)
    runner.warmup()
    return Scheduler(sc, cc, runner.num_pages), runner


def step(sched, runner, log=None):
    out = sched.schedule()
    if log is not None:
        log.append(out)
    if not out.seqs:
        return out, []
    inputs = batch.build(out, page_size=runner.page_size, token_buckets=runner.token_buckets,
                         seq_buckets=runner.seq_buckets, max_pages_per_seq=runner.max_pages_per_seq)
    res = runner.execute(inputs)
    deltas = sched.update(out, res.sampled_token_ids)
    sched.check_invariants()
    return out, deltas


def run_all(sched, runner, max_steps=1000, log=None, got=None):
    got = {} if got is None else got
    for _ in range(max_steps):
        if not sched.has_work():
            return got
        _, deltas = step(sched, runner, log)
        for d in deltas:
            got.setdefault(d.request_id, []).extend(d.new_token_ids)
    raise AssertionError("did not finish")


def reference(prompt, n):
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(mock_next_token(ctx, V))
    return ctx[len(prompt):]


def req(rid, prompt, max_tokens=4, **kw):
    return Request(rid, list(prompt), dataclasses.replace(GREEDY, max_tokens=max_tokens, **kw))


def test_chunked_prefill_then_decode():
    sched, runner = make(budget=16)
    sched.add(req("a", range(1, 41), max_tokens=3))
    log = []
    got = run_all(sched, runner, log=log)
    sizes = [o.num_scheduled_tokens for o in log if o.seqs]
    assert sizes == [16, 16, 8, 1, 1]
    assert [s.samples for o in log[:3] for s in o.seqs] == [False, False, True]
    assert got["a"] == reference(range(1, 41), 3)


def test_decode_rows_come_first_and_budget_is_respected():
    sched, runner = make(budget=16)
    sched.add(req("old", [5, 6, 7], max_tokens=6))
    step(sched, runner)  # old prefilled, now decoding
    sched.add(req("new", range(100, 130), max_tokens=2))
    out, _ = step(sched, runner)
    assert [s.request_id for s in out.seqs] == ["old", "new"]
    assert [s.num_new_tokens for s in out.seqs] == [1, 15]
    got = run_all(sched, runner)
    assert got["new"] == reference(range(100, 130), 2)


def test_max_num_seqs_cap_and_fcfs():
    sched, runner = make(budget=64, seqs=2)
    for i in range(4):
        sched.add(req(f"r{i}", [i + 1] * 5, max_tokens=3))
    out, deltas = step(sched, runner)
    assert [s.request_id for s in out.seqs] == ["r0", "r1"]
    assert len(sched.running) == 2 and [r.request_id for r in sched.waiting] == ["r2", "r3"]
    got = run_all(sched, runner, got={d.request_id: list(d.new_token_ids) for d in deltas})
    assert got == {f"r{i}": reference([i + 1] * 5, 3) for i in range(4)}


def test_preemption_and_resume_give_identical_outputs():
    # 9 usable pages of 8 tokens; 6 requests of up to 30 tokens each cannot all fit.
    sched, runner = make(budget=32, seqs=8, pages=10, prefix=False)
    prompts = {f"r{i}": [10 * i + j for j in range(3 + 3 * i)] for i in range(6)}
    for rid, p in prompts.items():
        sched.add(req(rid, p, max_tokens=12))
    got = run_all(sched, runner)
    assert sched.num_preemptions > 0
    assert got == {rid: reference(p, 12) for rid, p in prompts.items()}
    assert sched.allocator.num_used == 0


def test_preempted_request_recomputes_from_cache_when_prefix_caching():
    sched, runner = make(budget=32, seqs=8, pages=10, prefix=True)
    prompts = {f"r{i}": [10 * i + j for j in range(3 + 3 * i)] for i in range(6)}
    for rid, p in prompts.items():
        sched.add(req(rid, p, max_tokens=12))
    got = run_all(sched, runner)
    assert sched.num_preemptions > 0 and sched.prefix_cache_hits > 0
    assert got == {rid: reference(p, 12) for rid, p in prompts.items()}


def test_abort_at_any_moment_frees_pages():
    for abort_after in range(0, 6):
        sched, runner = make(budget=16, pages=20)
        sched.add(req("a", range(1, 20), max_tokens=5))
        sched.add(req("b", range(50, 60), max_tokens=5))
        got: dict[str, list[int]] = {}
        for _ in range(abort_after):
            for d in step(sched, runner)[1]:
                got.setdefault(d.request_id, []).extend(d.new_token_ids)
        out = sched.abort("a")
        assert out is not None and out.finished and out.finish_reason == "abort"
        assert sched.abort("a") is None  # unknown now
        sched.check_invariants()
        got = run_all(sched, runner, got=got)
        assert "a" not in sched.requests
        assert got["b"] == reference(range(50, 60), 5)
        assert sched.allocator.num_used == 0


def test_abort_between_schedule_and_update_drops_the_token():
    sched, runner = make()
    sched.add(req("a", [1, 2, 3]))
    out = sched.schedule()
    sched.abort("a")
    inputs = batch.build(out, page_size=8, token_buckets=runner.token_buckets,
                         seq_buckets=runner.seq_buckets, max_pages_per_seq=runner.max_pages_per_seq)
    assert sched.update(out, runner.execute(inputs).sampled_token_ids) == []
    sched.check_invariants()


def test_prefix_hits_are_counted_and_outputs_unchanged():
    sched, runner = make(budget=64)
    shared = list(range(1, 34))  # 4 full pages + 1
    sched.add(req("first", shared + [900], max_tokens=3))
    run_all(sched, runner)
    hits0 = sched.prefix_cache_hits
    sched.add(req("second", shared + [901, 902], max_tokens=3))
    out, deltas = step(sched, runner)
    assert sched.prefix_cache_hits - hits0 == 32
    assert out.seqs[0].start_position == 32 and out.seqs[0].num_new_tokens == 3
    got = run_all(sched, runner, got={"second": list(deltas[0].new_token_ids)})
    assert got["second"] == reference(shared + [901, 902], 3)
    assert sched.requests == {}


def test_full_prompt_hit_still_computes_last_token():
    sched, runner = make()
    sched.add(req("a", range(1, 17), max_tokens=2))
    run_all(sched, runner)
    sched.add(req("b", range(1, 17), max_tokens=2))
    out, deltas = step(sched, runner)
    assert out.seqs[0].start_position == 8 and out.seqs[0].num_new_tokens == 8
    assert deltas[0].new_token_ids[0] == reference(range(1, 17), 1)[0]


def test_page_exhaustion_rejects_and_queues():
    sched, runner = make(pages=5, max_len=64)  # 4 usable pages = 32 tokens
    with pytest.raises(ValueError, match="num_pages"):
        sched.add(req("huge", range(1, 31), max_tokens=8))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add(req("long", range(1, 64), max_tokens=2))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        sched.add(req("empty", []))
    sched.add(req("a", range(1, 10), max_tokens=4))
    with pytest.raises(ValueError, match="request_id"):
        sched.add(req("a", range(1, 10), max_tokens=4))
    sched.add(req("b", range(20, 29), max_tokens=4))
    sched.add(req("c", range(40, 49), max_tokens=4))
    out, _ = step(sched, runner)
    assert {s.request_id for s in out.seqs} == {"a", "b"}  # c waits: no pages left
    got = run_all(sched, runner)
    assert got["c"] == reference(range(40, 49), 4)


def test_stop_token_eos_min_tokens_and_length():
    sched, runner = make()
    prompt = [3, 4, 5]
    ref = reference(prompt, 6)
    sched.add(req("stopid", prompt, max_tokens=6, stop_token_ids=(ref[2],)))
    r = req("eos", prompt, max_tokens=6)
    r.eos_token_ids = (ref[1],)
    sched.add(r)
    r = req("min", prompt, max_tokens=6, min_tokens=3)
    r.eos_token_ids = (ref[1],)
    sched.add(r)
    r = req("ign", prompt, max_tokens=6, ignore_eos=True)
    r.eos_token_ids = (ref[1],)
    sched.add(r)
    finals = {}
    while sched.has_work():
        for d in step(sched, runner)[1]:
            if d.finished:
                finals[d.request_id] = (d.num_output_tokens, d.finish_reason, d.stop_reason)
    assert finals == {"stopid": (3, "stop", ref[2]), "eos": (2, "stop", None),
                      "min": (6, "length", None), "ign": (6, "length", None)}


def test_wait_for_sibling_shares_prompt_pages():
    sched, runner = make(budget=64)
    prompt = list(range(1, 18))
    sched.add(req("p#0", prompt, max_tokens=4))
    sched.add(req("p#1", prompt, max_tokens=2), wait_for="p#0")
    out, _ = step(sched, runner)
    assert [s.request_id for s in out.seqs] == ["p#0"]
    out, _ = step(sched, runner)
    s1 = [s for s in out.seqs if s.request_id == "p#1"][0]
    assert s1.start_position == 16  # 2 shared pages
    assert len(set(s1.page_ids) & set(sched.requests["p#0"].page_ids)) == 2
    run_all(sched, runner)


def test_scheduling_one_step_ahead_uses_a_placeholder():
    sched, runner = make()
    sched.add(req("a", [1, 2, 3], max_tokens=3))
    first = sched.schedule()
    second = sched.schedule()  # before the first step's token is known
    (q,) = second.seqs
    assert q.placeholder and q.start_position == 3 and q.output_position == 1
    assert sched.schedule().seqs == ()  # at most one token in flight
    kw = dict(page_size=8, token_buckets=runner.token_buckets, seq_buckets=runner.seq_buckets,
              max_pages_per_seq=runner.max_pages_per_seq)
    out1 = runner.execute(batch.build(first, **kw)).sampled_token_ids
    inputs2 = batch.build(second, **kw)
    batch.fill_placeholders(inputs2, second, first, out1)
    out2 = runner.execute(inputs2).sampled_token_ids
    d1 = sched.update(first, out1)
    third = sched.schedule()  # one token in flight again: decode it with a placeholder
    d2 = sched.update(second, out2)
    assert third.seqs[0].placeholder
    assert [d.new_token_ids[0] for d in d1 + d2] == reference([1, 2, 3], 2)
    assert sched.schedule().seqs == ()  # the third token ends the request by length
    sched.check_invariants()


def test_results_of_a_preempted_generation_are_dropped():
    sched, runner = make()
    sched.add(req("a", [1, 2, 3], max_tokens=3))
    first = sched.schedule()
    sched._preempt(sched.requests["a"])
    assert sched.update(first, [7] * 8) == []
    assert sched.requests["a"].output_token_ids == []
    got = run_all(sched, runner)
    assert got["a"] == reference([1, 2, 3], 3)


def test_build_pads_to_buckets():
    import numpy as np

    from xlaserve.runtime.scheduler import ScheduledSeq, SchedulerOutput

    sp = SamplingParams(temperature=0.5, top_k=3, seed=11)
    a = ScheduledSeq("a", (5, 6, 7), 8, (3, 4), True, sp, 0)
    b = ScheduledSeq("b", (9,), 16, (7, 2, 5), True, dataclasses.replace(sp, seed=None), 4)
    out = SchedulerOutput((a, b))
    x = batch.build(out, page_size=8, token_buckets=(16, 32), seq_buckets=(8,),
                    max_pages_per_seq=4)
    assert x.token_ids.shape == (16,) and x.kv_lens.shape == (8,) and x.num_seqs.tolist() == [2]
    assert x.token_ids[:4].tolist() == [5, 6, 7, 9] and not x.token_ids[4:].any()
    assert x.positions[:4].tolist() == [8, 9, 10, 16] and not x.positions[4:].any()
    assert x.slot_mapping[:4].tolist() == [4 * 8 + 0, 4 * 8 + 1, 4 * 8 + 2, 5 * 8 + 0]
    assert not x.slot_mapping[4:].any()  # padded rows write to page 0
    assert x.cu_q_lens.tolist() == [0, 3, 4] + [4] * 6
    assert x.kv_lens.tolist() == [11, 17] + [0] * 6
    assert x.logits_indices[:2].tolist() == [2, 3]
    assert x.page_table[0].tolist() == [3, 4, 0, 0] and x.page_table[1].tolist() == [7, 2, 5, 0]
    assert not x.page_table[2:].any()
    smp = x.sampling
    assert smp.seeds.dtype == np.uint32 and smp.seeds[:2].tolist() == [11, 0]
    assert smp.output_positions[:2].tolist() == [0, 4] and smp.top_k[:2].tolist() == [3, 3]
    assert smp.temperature[2:].tolist() == [0.0] * 6 and smp.top_p[2:].tolist() == [1.0] * 6
    assert smp.prompt_token_ids.shape == (8, 1) and (smp.prompt_token_ids == -1).all()
    pen = dataclasses.replace(a, sampling=dataclasses.replace(sp, repetition_penalty=1.2),
                              prompt_token_ids=(1, 2, 3, 4, 5), output_token_ids=(6, 7))
    y = batch.build(SchedulerOutput((pen, b)), page_size=8, token_buckets=(16,),
                    seq_buckets=(8,), max_pages_per_seq=4)
    assert y.sampling.prompt_token_ids.shape == (8, 8)  # a power of two >= 5
    assert y.sampling.prompt_token_ids[0].tolist() == [1, 2, 3, 4, 5, -1, -1, -1]
    assert y.sampling.output_token_ids[0, :3].tolist() == [6, 7, -1]
    assert (y.sampling.prompt_token_ids[1] == -1).all()
    with pytest.raises(ValueError, match="num_scheduled_tokens"):
        batch.build(out, page_size=8, token_buckets=(2,), seq_buckets=(8,), max_pages_per_seq=4)


def test_build_keeps_seq_bucket_within_token_bucket():
    from xlaserve.runtime.scheduler import ScheduledSeq, SchedulerOutput

    seqs = tuple(ScheduledSeq(f"r{i}", (1,), 0, (i + 1,), True, GREEDY, 0) for i in range(17))
    x = batch.build(SchedulerOutput(seqs), page_size=8, token_buckets=(16, 24, 32),
                    seq_buckets=(8, 16, 32), max_pages_per_seq=2)
    assert (x.num_tokens_bucket, x.num_seqs_bucket) == (32, 32)
