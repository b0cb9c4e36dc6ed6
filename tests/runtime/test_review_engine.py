"""Review regressions for the engine's host path (batch.build buckets)."""

from __future__ import annotations

from xlaserve.runtime import batch
from xlaserve.runtime.config import CacheConfig, EngineConfig, SchedulerConfig
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.mock_runner import MockRunner, mock_next_token
from xlaserve.runtime.request import SamplingParams

V = 1000


def _engine(budget: int, seqs: int, pages: int = 128) -> Engine:
    cfg = EngineConfig(cache=CacheConfig(page_size=8, num_pages=pages),
                       scheduler=SchedulerConfig(max_num_batched_tokens=budget,
                                                 max_num_seqs=seqs, max_model_len=64))
    runner = MockRunner(cfg.cache, cfg.scheduler, vocab_size=V)
    runner.warmup()
    return Engine(cfg, runner)


def test_more_sequences_than_the_largest_token_bucket_allows_as_s_bucket() -> None:
    """max_num_batched_tokens=20 (token buckets 16, 20), max_num_seqs=32 (seq buckets 8, 16, 32):
    17..20 one-token sequences fit the budget, but their S bucket (32) is larger than every T
    bucket. build() used to raise ValueError ("num_seqs=32: exceeds the largest bucket 20"),
    failing every request of the step; the runner compiles (20, 32) for exactly this case."""
    e = _engine(budget=20, seqs=32)
    prompts = {f"q{i}": [i + 1] for i in range(18)}
    for rid, p in prompts.items():
        e.add_request(rid, p, SamplingParams(temperature=0, max_tokens=3))
    got: dict[str, list[int]] = {}
    for _ in range(100):
        if not e.has_work():
            break
        for out in e.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    for rid, p in prompts.items():
        ctx = list(p)
        for _ in range(3):
            ctx.append(mock_next_token(ctx, V))
        assert got[rid] == ctx[1:], rid
    assert e.stats().compiles_after_warmup == 0


def test_build_keeps_t_when_s_exceeds_every_token_bucket() -> None:
    from xlaserve.runtime.scheduler import ScheduledSeq, SchedulerOutput
    sp = SamplingParams(temperature=0, seed=0)
    seqs = tuple(ScheduledSeq(f"s{i}", (1,), 0, (i + 1,), True, sp, 0) for i in range(17))
    inputs = batch.build(SchedulerOutput(seqs), page_size=8, token_buckets=(16, 20),
                         seq_buckets=(8, 16, 32), max_pages_per_seq=8)
    assert (inputs.num_tokens_bucket, inputs.num_seqs_bucket) == (20, 32)



def test_abort_then_reuse_id_ignores_the_stale_in_flight_result() -> None:
    """abort("a") then add_request("a", ...) while a step of the old "a" is still in flight: that
    step's sampled token must not be appended to the new "a" (the generation check compared two
    zeros: a re-added id starts at generation 0 too)."""
    e = _engine(budget=32, seqs=8)
    e.add_request("a", [1, 2, 3], SamplingParams(temperature=0, max_tokens=8))
    e.step()
    e.step()  # one step of "a" is now in flight (one step ahead)
    assert e._inflight is not None
    e.abort("a")
    e.add_request("a", [9, 8, 7, 6], SamplingParams(temperature=0, max_tokens=5))
    ids: list[int] = []
    final = None
    for _ in range(50):
        if not e.has_work():
            break
        for out in e.step():
            if out.request_id == "a" and out.finish_reason != "abort":
                ids += out.new_token_ids
                final = out if out.finished else final
    ctx = [9, 8, 7, 6]
    for _ in range(5):
        ctx.append(mock_next_token(ctx, V))
    assert ids == ctx[4:]
    assert final is not None and final.finish_reason == "length"
    e.scheduler.check_invariants()


def test_abort_then_reuse_parent_id_keeps_the_new_children_abortable() -> None:
    """abort("x") (n = 2), add_request("x", n = 2) again, step, abort("x"): the new children must
    be aborted. The old children's pending abort outputs, returned by the step, used to remove
    the *new* children from the parent's list, so the second abort found nothing to abort and
    the new children ran on."""
    e = _engine(budget=32, seqs=8)
    sp = SamplingParams(temperature=0, max_tokens=20, n=2)
    e.add_request("x", [1, 2, 3], sp)
    e.step()
    e.abort("x")
    e.add_request("x", [4, 5, 6], sp)
    e.step()
    e.abort("x")
    tokens_after_abort = 0
    for _ in range(50):
        if not e.has_work():
            break
        tokens_after_abort += sum(len(o.new_token_ids) for o in e.step())
    assert tokens_after_abort == 0
    assert e.stats().num_pages_used == 0 and not e.scheduler.requests


def test_aborting_one_child_frees_the_parent_id_once_all_end() -> None:
    e = _engine(budget=32, seqs=8)
    e.add_request("x", [1, 2, 3], SamplingParams(temperature=1.0, seed=3, max_tokens=4, n=3))
    e.step()
    e.abort("x#1")
    finals = []
    for _ in range(50):
        if not e.has_work():
            break
        finals += [o.request_id for o in e.step() if o.finished]
    assert sorted(finals) == ["x#0", "x#1", "x#2"]
    e.add_request("x", [4, 5], SamplingParams(temperature=0, max_tokens=2))  # id free again


def test_add_request_that_fails_on_a_child_id_adds_nothing() -> None:
    """n = 2 request "x" while a request named "x#1" runs: the ValueError must leave no
    half-added "x#0" behind (it ran on, unknown to the caller and not abortable as "x")."""
    e = _engine(budget=32, seqs=8)
    e.add_request("x#1", [1, 2], SamplingParams(temperature=0, max_tokens=2))
    try:
        e.add_request("x", [3, 4], SamplingParams(temperature=0, max_tokens=2, n=2))
    except ValueError as err:
        assert "x#1" in str(err)
    else:
        raise AssertionError("no ValueError")
    assert sorted(e.scheduler.requests) == ["x#1"]


def test_stop_strings_wait_for_min_tokens() -> None:
    """min_tokens holds back stop strings too (as EOS and stop token ids; vLLM #21987 / #22014):
    a stop string inside the first min_tokens tokens does not end the request."""
    from test_engine_mock import CharDetok  # tests/runtime/ (pytest puts it on sys.path)

    from xlaserve.runtime.output import OutputProcessor
    from xlaserve.runtime.request import RequestOutput

    p = OutputProcessor(CharDetok)
    p.add("r", [0], SamplingParams(stop=("b",), min_tokens=2, max_tokens=10))
    texts, stops = [], []
    for i, tok in enumerate([1, 0, 1, 2]):  # "b", "a", "b", "c"
        out, stop = p.process(RequestOutput("r", (tok,), "", False, num_output_tokens=i + 1))
        texts.append(out.new_text)
        stops.append(stop)
        if stop:
            break
    assert stops == [None, None, "b"]
    assert "".join(texts) == "ba"


def test_an_output_processing_error_fails_only_its_request() -> None:
    """A detokenizer that raises for one request ends that request (error final, pages freed);
    the others run to completion with their normal tokens."""

    class Detok:
        def __init__(self, prompt_ids):
            self.bad = list(prompt_ids) == [666]

        def add(self, ids):
            if self.bad:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "planted")
            return "".join(chr(65 + i % 26) for i in ids)

        def flush(self):
            return ""

    cfg = EngineConfig(cache=CacheConfig(page_size=8, num_pages=64),
                       scheduler=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8,
                                                 max_model_len=64))
    runner = MockRunner(cfg.cache, cfg.scheduler, vocab_size=V)
    runner.warmup()
    e = Engine(cfg, runner, detokenizer_factory=Detok)
    prompts = {"ok1": [5, 6], "bad": [666], "ok2": [7]}
    for rid, p in prompts.items():
        e.add_request(rid, p, SamplingParams(temperature=0, max_tokens=4))
    got: dict[str, list[int]] = {}
    finals = {}
    for _ in range(50):
        if not e.has_work():
            break
        for out in e.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finals[out.request_id] = out
    assert finals["bad"].finish_reason == "abort" and "planted" in finals["bad"].error
    for rid in ("ok1", "ok2"):
        ctx = list(prompts[rid])
        for _ in range(4):
            ctx.append(mock_next_token(ctx, V))
        assert got[rid] == ctx[len(prompts[rid]):] and finals[rid].finish_reason == "length"
    stats = e.stats()
    assert stats.num_running == 0 and stats.num_pages_used == 0
