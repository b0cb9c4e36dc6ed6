"""Engine over MockRunner (no model): deltas, stop strings, n > 1, abort, logprobs, stats."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xlaserve.runtime.config import CacheConfig, EngineConfig, SchedulerConfig
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.mock_runner import MockRunner, mock_next_token, mock_sampled_token
from xlaserve.runtime.request import SamplingParams

V = 1000


class CharDetok:
    """Token t -> one letter; a stand-in for the real IncrementalDetokenizer."""

    def __init__(self, prompt):
        pass

    def add(self, ids):
        return "".join(chr(97 + t % 26) for t in ids)

    def flush(self):
        return ""


def text_of(ids):
    return "".join(chr(97 + t % 26) for t in ids)


def make_engine(budget=32, seqs=8, pages=64, max_len=256, eos=(), async_scheduling=True):
    cfg = EngineConfig(cache=CacheConfig(page_size=8, num_pages=pages),
                       scheduler=SchedulerConfig(max_num_batched_tokens=budget,
                                                 max_num_seqs=seqs, max_model_len=max_len))
    runner = MockRunner(cfg.cache, cfg.scheduler, vocab_size=V)
    runner.warmup()
    return Engine(cfg, runner, detokenizer_factory=CharDetok, eos_token_ids=eos,
                  async_scheduling=async_scheduling)


@pytest.fixture(params=[True, False], ids=["async", "sync"])
def overlap(request):
    return request.param


def collect(got, outs):
    for o in outs:
        g = got.setdefault(o.request_id, {"ids": [], "text": "", "final": None})
        g["ids"] += o.new_token_ids
        g["text"] += o.new_text
        if o.finished:
            assert g["final"] is None, "two final outputs"
            g["final"] = o
    return got


def run(engine, max_steps=2000, got=None):
    got = {} if got is None else got
    for _ in range(max_steps):
        if not engine.has_work():
            return got
        collect(got, engine.step())
    raise AssertionError("engine did not drain")


def reference(prompt, n):
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(mock_next_token(ctx, V))
    return ctx[len(prompt):]


def test_deltas_and_text_match_reference(overlap):
    e = make_engine(async_scheduling=overlap)
    prompts = {f"r{i}": list(range(i, i + 5 + 7 * i)) for i in range(5)}
    for rid, p in prompts.items():
        e.add_request(rid, p, SamplingParams(temperature=0, max_tokens=6))
    got = run(e)
    for rid, p in prompts.items():
        ref = reference(p, 6)
        assert got[rid]["ids"] == ref and got[rid]["text"] == text_of(ref)
        assert got[rid]["final"].finish_reason == "length"
        assert got[rid]["final"].num_output_tokens == 6
    st = e.stats()
    assert st.num_pages_used == 0 and st.num_running == 0 and st.num_waiting == 0
    assert st.num_pages_used + st.num_pages_free + st.num_pages_cached == st.num_pages_total


def test_stop_string_trims_and_frees(overlap):
    e = make_engine(async_scheduling=overlap)
    prompt = [1, 2, 3]
    ref_text = text_of(reference(prompt, 12))
    stop = ref_text[4:6]
    e.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=12, stop=[stop]))
    got = run(e)["s"]
    cut = ref_text.find(stop)
    assert got["text"] == ref_text[:cut]
    assert got["final"].finish_reason == "stop" and got["final"].stop_reason == stop
    assert len(got["ids"]) == cut + len(stop)  # the tokens up to the stop were generated
    assert e.stats().num_pages_used == 0 and not e.scheduler.requests


def test_eos_stops_with_reason_stop():
    prompt = [4, 5, 6]
    ref = reference(prompt, 8)
    e = make_engine(eos=(ref[3],))
    e.add_request("e", prompt, SamplingParams(temperature=0, max_tokens=8))
    got = run(e)["e"]
    assert got["ids"] == ref[:4] and got["final"].finish_reason == "stop"


def test_n_samples_share_prompt_pages_and_use_distinct_seeds():
    e = make_engine()
    prompt = list(range(100, 140))  # 5 full pages
    e.add_request("p", prompt, SamplingParams(temperature=1.0, max_tokens=5, n=3, seed=7))
    got = run(e)
    assert set(got) == {"p#0", "p#1", "p#2"}
    for i in range(3):
        assert got[f"p#{i}"]["ids"] == [mock_sampled_token(7 + i, k, V) for k in range(5)]
    assert e.stats().prefix_cache_hits == 2 * 32  # children 1 and 2 reuse 4 full pages each


def test_abort_emits_final_output_and_aborts_children(overlap):
    e = make_engine(async_scheduling=overlap)
    e.add_request("a", list(range(30)), SamplingParams(temperature=1.0, max_tokens=50, n=2))
    e.add_request("b", [1, 2, 3], SamplingParams(temperature=0, max_tokens=5))
    e.step()
    e.step()
    e.abort("a")
    e.abort("nope")  # unknown ids are ignored
    assert e.stats().num_pages_used == len(e.scheduler.requests["b"].page_ids)
    outs = e.step()
    finals = {o.request_id: o.finish_reason for o in outs if o.finished}
    assert finals["a#0"] == "abort" and finals["a#1"] == "abort"
    got = run(e)
    assert "a#0" not in got and got["b"]["final"].finish_reason == "length"


def test_add_request_errors_name_the_field():
    e = make_engine(max_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        e.add_request("x", list(range(60)), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        e.add_request("x", [], SamplingParams())
    e.add_request("x", [1], SamplingParams())
    with pytest.raises(ValueError, match="request_id"):
        e.add_request("x", [1], SamplingParams())
    e.add_request("y", [1], SamplingParams(n=2))
    with pytest.raises(ValueError, match="request_id"):
        e.add_request("y", [1], SamplingParams())


def test_logprobs_plumbed_through():
    e = make_engine()
    e.add_request("l", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3, logprobs=2))
    e.add_request("m", [1, 2, 3], SamplingParams(temperature=0, max_tokens=3))
    outs = [o for _ in range(10) for o in e.step()]
    lps = [lp for o in outs if o.request_id == "l" for lp in o.new_logprobs]
    assert [lp.token_id for lp in lps] == reference([1, 2, 3], 3)
    assert all(len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in lps)
    assert all(o.new_logprobs == () for o in outs if o.request_id == "m")


def test_random_requests_drain_with_no_compiles_after_warmup(overlap):
    e = make_engine(budget=64, seqs=16, pages=40, async_scheduling=overlap)
    rng = random.Random(0)
    want, got = {}, {}
    for i in range(200):
        p = [rng.randrange(V) for _ in range(rng.randint(1, 60))]
        n = rng.randint(1, 20)
        e.add_request(f"q{i}", p, SamplingParams(temperature=0, max_tokens=n))
        want[f"q{i}"] = reference(p, n)
        if i % 7 == 0:
            for _ in range(3):
                collect(got, e.step())
                e.scheduler.check_invariants()
    run(e, got=got)
    assert {k: v["ids"] for k, v in got.items()} == want
    assert e.stats().compiles_after_warmup == 0
    assert e.stats().num_preemptions > 0  # the KV budget was tight


def test_async_scheduling_builds_next_step_while_device_runs():
    e = make_engine()
    events = []
    runner, sched = e.runner, e.scheduler
    real_exec, real_schedule = runner.execute_async, sched.schedule

    class Handle:
        def __init__(self, h, k):
            self.h, self.k = h, k

        def result(self):
            events.append(("result", self.k))
            return self.h.result()

    def execute_async(inputs, **kw):
        k = sum(1 for ev in events if ev[0] == "dispatch")
        events.append(("dispatch", k))
        return Handle(real_exec(inputs, **kw), k)

    def schedule():
        events.append(("schedule",))
        return real_schedule()
    runner.execute_async, sched.schedule = execute_async, schedule
    e.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=5))
    got = run(e)
    assert got["a"]["ids"] == reference([1, 2, 3], 5)
    # Step 1 is scheduled after step 0 was dispatched, and dispatched (chained: its placeholder
    # token comes from step 0's output on the device) before step 0's result is waited on.
    assert events[:5] == [("schedule",), ("dispatch", 0), ("schedule",), ("dispatch", 1),
                          ("result", 0)]
    assert runner.num_chained_steps == 4  # every decode step after the first
    assert e.stats().num_steps == 5  # the in-flight token ending the request is not re-run


def test_penalty_history_placeholders_wait_for_the_previous_step_on_the_host():
    """A penalty needs the placeholder token in the history: no chaining, filled on the host."""
    e = make_engine()
    events = []
    runner = e.runner
    real_exec = runner.execute_async

    def execute_async(inputs, **kw):
        events.append(("dispatch", "prev" in kw))
        return real_exec(inputs, **kw)
    runner.execute_async = execute_async
    e.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=5,
                                                 repetition_penalty=1.5))
    e.add_request("b", [4, 5], SamplingParams(temperature=0, max_tokens=5))
    got = run(e)
    assert got["b"]["ids"] == reference([4, 5], 5)
    assert len(got["a"]["ids"]) == 5
    assert runner.num_chained_steps == 0 and events and not any(c for _, c in events)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "step", "step", "abort"]),
                              st.integers(0, 10**6)), max_size=40),
       overlap=st.booleans())
def test_random_add_step_abort_sequences(ops, overlap):
    """Any interleaving keeps the page invariants; survivors match the reference exactly."""
    e = make_engine(budget=16, seqs=4, pages=12, max_len=64, async_scheduling=overlap)
    want, got, aborted = {}, {}, set()
    for op, r in ops:
        if op == "add":
            rng = random.Random(r)
            prompt = [rng.randrange(V) for _ in range(rng.randint(1, 30))]
            n = rng.randint(1, 10)
            rid = f"q{len(want)}"
            e.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=n))
            want[rid] = reference(prompt, n)
        elif op == "step":
            collect(got, e.step())
        elif op == "abort" and want:
            rid = sorted(want)[r % len(want)]
            e.abort(rid)
            aborted.add(rid)
        e.scheduler.check_invariants()
    run(e, got=got)
    for rid, ref in want.items():
        g = got.get(rid, {"ids": [], "final": None})
        if rid in aborted:
            assert ref[:len(g["ids"])] == g["ids"]
            assert g["final"].finish_reason in ("abort", "length")
        else:
            assert g["ids"] == ref and g["final"].finish_reason == "length"
    assert e.stats().num_pages_used == 0


@pytest.mark.parametrize("kwargs,field", [
    (dict(top_k=2**31), "top_k"), (dict(max_tokens=2**31), "max_tokens"),
    (dict(stop_token_ids=[2**40]), "stop_token_ids"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids"), (dict(stop_token_ids=["7"]), "stop_token_ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids"), (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(stop_token_ids="12"), "stop_token_ids"), (dict(logit_bias=5), "logit_bias"),
])
def test_sampling_values_past_int32_are_refused_before_they_reach_a_step(kwargs, field):
    # The step's sampling arrays are int32: such a value used to fail the whole batch mid-step.
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_stop_token_ids_take_numpy_ints():
    import numpy as np
    assert SamplingParams(stop_token_ids=[np.int64(3), 4]).stop_token_ids == (3, 4)


def test_top_k_minus_one_is_off():
    assert SamplingParams(top_k=-1).top_k == 0
    with pytest.raises(ValueError, match="top_k=-2"):
        SamplingParams(top_k=-2)


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_tokens="5"), "max_tokens"), (dict(min_tokens="1"), "min_tokens"),
    (dict(max_tokens=True), "max_tokens"), (dict(n=True), "n"),
    (dict(temperature=True), "temperature"),
    (dict(stop=5), "stop"), (dict(ignore_eos="false"), "ignore_eos"),
    (dict(include_stop_str_in_output=1), "include_stop_str_in_output"),
])
def test_wrong_types_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        SamplingParams(**kwargs)


def test_logit_bias_normalization_and_errors():
    """A mapping or pairs become sorted pairs; None is no bias (vLLM's default); errors name the
    field, check the count first and quote briefly (gRPC status messages must stay small)."""
    assert SamplingParams(logit_bias={9: 1, 2: -100.0}).logit_bias == ((2, -100.0), (9, 1.0))
    assert SamplingParams(logit_bias=[(3, 0.5)]).logit_bias == ((3, 0.5),)
    assert SamplingParams(logit_bias=None).logit_bias == ()
    for bad, msg in (({"5": 1}, "token id '5'"), ({5: 101}, "bias 101 for token 5"),
                     ({5: True}, "bias True"), ({True: 1}, "token id True"),
                     ([(1, 1.0), (1, 2.0)], "appears twice"), (5, "must map token ids"),
                     ({i: 200.0 for i in range(5000)}, "5000 entries; at most 300")):
        with pytest.raises(ValueError, match="^logit_bias") as info:
            SamplingParams(logit_bias=bad)
        assert msg in str(info.value) and len(str(info.value)) < 200
