"""End to end on the builtin tiny model (real runner, CPU): batching, chunked prefill, preemption
and prefix caching never change greedy outputs; seeded sampling ignores batch composition; no
compiles after warm-up."""

from __future__ import annotations

import random

import pytest

from xlaserve.runtime.config import CacheConfig, EngineConfig, SchedulerConfig
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.request import SamplingParams
from xlaserve.runtime.scheduler import Scheduler

SCHED = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=16, max_model_len=128)
CACHE = CacheConfig(page_size=8, num_pages=96)


@pytest.fixture(scope="module")
def runner():
    from xlaserve.checkpoints.loader import load_model
    from xlaserve.runtime.model_runner import ModelRunner

    loaded = load_model("builtin:tiny", dtype="float32")
    r = ModelRunner(loaded.config, loaded.params, CACHE, SCHED, enable_penalties=False)
    r.warmup()
    r.loaded = loaded
    return r


def engine_for(runner, *, num_pages=None, prefix=True, async_scheduling=True):
    """A fresh engine (fresh scheduler and prefix cache) over the shared runner; `num_pages`
    lets the scheduler use only part of the runner's KV pages (a tiny KV budget)."""
    from xlaserve.checkpoints.tokenizer import Tokenizer

    cache = CacheConfig(page_size=8, num_pages=runner.num_pages, enable_prefix_caching=prefix)
    e = Engine(EngineConfig(cache=cache, scheduler=SCHED), runner,
               tokenizer=Tokenizer.from_dir(runner.loaded.model_dir),
               model_config=runner.loaded.config, async_scheduling=async_scheduling)
    e.scheduler = Scheduler(SCHED, cache, num_pages or runner.num_pages)
    return e


def run(engine, reqs):
    for rid, prompt, sp in reqs:
        engine.add_request(rid, prompt, sp)
    got: dict[str, list[int]] = {}
    finals = {}
    for _ in range(5000):
        if not engine.has_work():
            break
        for o in engine.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finals[o.request_id] = o.finish_reason
    assert not engine.has_work()
    return got, finals


def random_requests(n, seed, vocab, sampling=None, max_prompt=70):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, max_prompt))]
        sp = sampling(rng) if sampling else SamplingParams(
            temperature=0.0, max_tokens=rng.randint(1, 24), ignore_eos=True)
        out.append((f"r{i}", prompt, sp))
    return out


def test_batched_chunked_preempted_greedy_equals_alone(runner):
    vocab = runner.loaded.config.vocab_size
    reqs = random_requests(32, 0, vocab)
    e = engine_for(runner, num_pages=24)  # 23 usable pages = 184 tokens: forces preemption
    batched, finals = run(e, reqs)
    assert e.stats().num_preemptions > 0
    assert any(len(p) > 64 for _, p, _ in reqs)  # chunked prefill (budget 64)
    assert set(finals.values()) == {"length"}
    assert runner.compiles_after_warmup == 0
    assert len({tuple(v) for v in batched.values()}) > 16  # the model's outputs vary
    for rid, prompt, sp in reqs:
        alone, _ = run(engine_for(runner, prefix=False, async_scheduling=False),
                       [(rid, prompt, sp)])
        assert batched[rid] == alone[rid], rid
    sync, _ = run(engine_for(runner, num_pages=24, async_scheduling=False), reqs)
    assert sync == batched


def test_shared_prefix_computed_once_outputs_unchanged(runner):
    vocab = runner.loaded.config.vocab_size
    rng = random.Random(1)
    prefix = [rng.randrange(3, vocab) for _ in range(56)]  # 7 full pages
    reqs = [(f"p{i}", prefix + [rng.randrange(3, vocab) for _ in range(i + 1)],
             SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)) for i in range(8)]
    cached = engine_for(runner)
    got, _ = run(cached, reqs[:1])
    more, _ = run(cached, reqs[1:])
    got.update(more)
    assert cached.stats().prefix_cache_hits >= 7 * 56
    plain = engine_for(runner, prefix=False)
    want, _ = run(plain, reqs)
    assert plain.stats().prefix_cache_hits == 0
    assert got == want


def test_seeded_sampling_ignores_batch_composition(runner):
    vocab = runner.loaded.config.vocab_size

    def sampling(rng):
        return SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=rng.randint(4, 16),
                              seed=rng.randrange(1 << 30), ignore_eos=True)
    reqs = random_requests(12, 2, vocab, sampling)
    together, _ = run(engine_for(runner, num_pages=24), reqs)
    reordered, _ = run(engine_for(runner), list(reversed(reqs)))
    assert together == reordered
    for rid, prompt, sp in reqs[:4]:
        alone, _ = run(engine_for(runner), [(rid, prompt, sp)])
        assert alone[rid] == together[rid]
    assert len({tuple(v) for v in together.values()}) > 1


def test_no_compiles_after_warmup_over_hundreds_of_requests(runner):
    vocab = runner.loaded.config.vocab_size

    def sampling(rng):
        return SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), top_k=rng.choice([0, 20]),
                              max_tokens=rng.randint(1, 12), stop=rng.choice([(), ("e",)]))
    reqs = random_requests(300, 3, vocab, sampling, max_prompt=100)
    e = engine_for(runner, num_pages=48)
    got, finals = run(e, reqs)
    assert len(finals) == 300
    assert runner.compiles_after_warmup == 0 and e.stats().compiles_after_warmup == 0


def test_min_tokens_holds_back_stop_token_ids(runner):
    """A stop token id that greedy decoding would emit early is held back until min_tokens."""
    prompt = [5, 17, 42, 99, 3]
    free, _ = run(engine_for(runner), [("a", prompt, SamplingParams(temperature=0,
                                                                     max_tokens=8))])
    stop_tok = free["a"][1]
    early, reasons = run(engine_for(runner), [("b", prompt, SamplingParams(
        temperature=0, max_tokens=8, stop_token_ids=(stop_tok,)))])
    assert reasons["b"] == "stop" and len(early["b"]) <= 2
    held, _ = run(engine_for(runner), [("c", prompt, SamplingParams(
        temperature=0, max_tokens=8, min_tokens=5, stop_token_ids=(stop_tok,)))])
    assert len(held["c"]) >= 5 and stop_tok not in held["c"][:5]
    assert held["c"][0] == free["a"][0]  # only the banned id changes the choice
