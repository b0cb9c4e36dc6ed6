"""Review regressions and properties of the engine core (scheduler, page allocator, engine loop)
over MockRunner: n > 1 siblings, id reuse, and random add / step / abort runs with shared
prefixes, small page pools, stop conditions and both loop modes."""

from __future__ import annotations

import random

import pytest
from test_engine_mock import CharDetok, reference, text_of  # tests/runtime/ is on sys.path

from xlaserve.runtime.config import CacheConfig, EngineConfig, SchedulerConfig
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.mock_runner import MockRunner, mock_next_token, mock_sampled_token
from xlaserve.runtime.request import SamplingParams


def _engine(*, budget=32, seqs=8, pages=64, page=8, max_len=64, prefix=True, vocab=1000,
            eos=(), async_scheduling=True, detok=None):
    cfg = EngineConfig(cache=CacheConfig(page_size=page, num_pages=pages,
                                         enable_prefix_caching=prefix),
                       scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=seqs,
                                                 max_model_len=max_len))
    runner = MockRunner(cfg.cache, cfg.scheduler, vocab_size=vocab)
    runner.warmup()
    return Engine(cfg, runner, eos_token_ids=eos, async_scheduling=async_scheduling,
                  detokenizer_factory=detok)


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
def test_reused_leader_id_does_not_hold_the_sibling_forever(overlap):
    """n = 2 request "x": its child x#1 waits for x#0's prompt pages. Abort x#0 by its own id,
    then add an unrelated request that happens to be named "x#0". x#1 used to look its leader up
    by id, so it waited for the newcomer's prompt; the newcomer sits behind x#1 in the FCFS queue,
    so nothing was ever admitted again (x#1, the newcomer and every later request hung)."""
    e = _engine(async_scheduling=overlap)
    e.add_request("x", list(range(1, 18)), SamplingParams(temperature=0, max_tokens=3, n=2))
    e.abort("x#0")
    e.add_request("x#0", list(range(40, 60)), SamplingParams(temperature=0, max_tokens=3))
    e.add_request("y", [5, 6], SamplingParams(temperature=0, max_tokens=3))
    got: dict[str, list[int]] = {}
    finals = {}
    for _ in range(50):
        if not e.has_work():
            break
        for o in e.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finals[o.request_id] = o.finish_reason
    assert not e.has_work(), [r.request_id for r in e.scheduler.waiting]
    assert finals == {"x#0": "length", "x#1": "length", "y": "length"}
    assert got["x#1"] == reference(range(1, 18), 3)
    assert got["x#0"] == reference(range(40, 60), 3)
    assert e.stats().num_pages_used == 0


def test_mock_runner_rejects_a_sequence_with_no_new_token():
    """A real model has no logits row for a zero-length sequence (its logits index points into the
    previous sequence), so MockRunner must not sample one from the cache: else a scheduler that
    took a prefix hit over the whole prompt (nothing left to compute) would look correct here."""
    from xlaserve.runtime import batch
    from xlaserve.runtime.scheduler import ScheduledSeq, SchedulerOutput

    cc, sc = CacheConfig(page_size=8, num_pages=4), SchedulerConfig(max_num_batched_tokens=16)
    runner = MockRunner(cc, sc)
    sp = SamplingParams(temperature=0, seed=0)
    kw = dict(page_size=8, token_buckets=runner.token_buckets, seq_buckets=runner.seq_buckets,
              max_pages_per_seq=runner.max_pages_per_seq)
    prefill = ScheduledSeq("a", tuple(range(1, 9)), 0, (1,), True, sp, 0)
    runner.execute(batch.build(SchedulerOutput((prefill,)), **kw))
    empty = ScheduledSeq("b", (), 8, (1,), True, sp, 0)  # all 8 tokens "cached", none computed
    with pytest.raises(RuntimeError, match="no new tokens"):
        runner.execute(batch.build(SchedulerOutput((empty,)), **kw))


def _expected(prompt, sp, eos, seed, vocab):
    """Tokens and finish of one sequence run alone (mock model, no min_tokens)."""
    ctx, out = list(prompt), []
    for j in range(sp.max_tokens):
        tok = (mock_next_token(ctx, vocab) if sp.temperature == 0
               else mock_sampled_token(seed, j, vocab))
        ctx.append(tok)
        out.append(tok)
        text = text_of(out)
        hits = [text.find(s) for s in sp.stop if s in text]
        if hits:
            return out, "stop", text[:min(hits)]
        if tok in sp.stop_token_ids or (not sp.ignore_eos and tok in eos):
            return out, "stop", text
    return out, "length", text_of(out)


def _run_random_engine(seed: int) -> None:
    rng = random.Random(seed)
    vocab = 16  # small: EOS, stop ids and stop strings are hit often
    page = rng.choice([8, 16])
    budget = rng.choice([16, 20, 32, 64])
    seqs = rng.choice([1, 2, 4, 32])
    pages = rng.choice([3, 5, 8, 16])
    max_len = 64
    eos = (rng.randrange(vocab),)
    e = _engine(budget=budget, seqs=seqs, pages=pages, page=page, max_len=max_len,
                prefix=rng.random() < 0.8, vocab=vocab, eos=eos,
                async_scheduling=rng.random() < 0.5, detok=CharDetok)
    sched = e.scheduler
    schedule = sched.schedule

    def checked_schedule():
        out = schedule()
        assert out.num_scheduled_tokens <= budget
        assert len(out.seqs) <= seqs and len(sched.running) <= seqs
        assert len({s.request_id for s in out.seqs}) == len(out.seqs)
        return out
    sched.schedule = checked_schedule  # instance attribute: this engine only
    bases = [[rng.randrange(3) for _ in range(64)] for _ in range(2)]  # shared prefixes
    want, sp_of, got, text, finals, aborted = {}, {}, {}, {}, {}, set()

    def step():
        for o in e.step():
            assert o.request_id not in finals, f"two finals for {o.request_id}"
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
            text[o.request_id] = text.get(o.request_id, "") + o.new_text
            if o.finished:
                finals[o.request_id] = o
        sched.check_invariants()

    for i in range(rng.randint(10, 50)):
        op = rng.random()
        if op < 0.4:
            length = rng.choice([1, page - 1, page, page + 1, 2 * page, rng.randint(1, 40)])
            prompt = rng.choice(bases)[:length]
            n_out = rng.randint(1, 12)
            if (len(prompt) + n_out > max_len
                    or -(-(len(prompt) + n_out) // page) > pages - 1):
                continue
            kw = {}
            if rng.random() < 0.3:
                kw["stop_token_ids"] = (rng.randrange(vocab),)
            if rng.random() < 0.3:
                kw["stop"] = (text_of([rng.randrange(vocab), rng.randrange(vocab)]),)
            if rng.random() < 0.2:
                kw["repetition_penalty"] = 1.1  # placeholders filled on the host
            n = rng.choice([1, 1, 2, 3])
            sp = SamplingParams(temperature=rng.choice([0.0, 0.0, 1.0]), max_tokens=n_out, n=n,
                                seed=1000 * i, ignore_eos=rng.random() < 0.2, **kw)
            rid = f"q{i}"
            e.add_request(rid, prompt, sp)
            for k, child in enumerate([rid] if n == 1 else [f"{rid}#{k}" for k in range(n)]):
                want[child] = _expected(prompt, sp, eos, 1000 * i + k, vocab)
                sp_of[child] = sp
        elif op < 0.85:
            step()
        elif want:
            rid = rng.choice(sorted(want))
            if "#" in rid and rng.random() < 0.5:
                rid = rid.rpartition("#")[0]
            e.abort(rid)
            aborted.add(rid)
            sched.check_invariants()
    for _ in range(2000):
        if not e.has_work():
            break
        step()
    assert not e.has_work(), "a request never finished"
    for rid, (ids, reason, txt) in want.items():
        assert rid in finals, f"{rid}: no final output"
        if rid in aborted or rid.rpartition("#")[0] in aborted:
            assert got.get(rid, []) == ids[:len(got.get(rid, []))], rid
            continue
        assert got[rid] == ids, (rid, sp_of[rid])
        assert finals[rid].finish_reason == reason and text[rid] == txt, rid
    a = sched.allocator
    assert a.num_used == 0 and a.num_free + a.num_cached == a.num_total  # nothing leaked
    assert not sched.requests and not e._children and not e._outputs._states


def test_random_add_step_abort_with_shared_prefixes_and_stops():
    """Every page free or owned and ref counts = owners after each step; no step over the token
    budget or the sequence cap; every request finishes, with its solo-run tokens, text and finish
    reason unless aborted; all pages come back at the end."""
    for seed in range(120):
        _run_random_engine(seed)
