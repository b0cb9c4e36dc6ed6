"""DataParallelEngine over MockRunner replicas (no model): routing, seeds, ids, abort, failures.

The real model at data 2 x model 1/2 is in tests/sharding/test_engine_dp.py.
"""

from __future__ import annotations

import pytest

from xlaserve.runtime.config import CacheConfig, EngineConfig, SchedulerConfig
from xlaserve.runtime.data_parallel import DataParallelEngine
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.mock_runner import MockRunner, mock_next_token, mock_sampled_token
from xlaserve.runtime.request import SamplingParams

V = 1000


def _engine(pages: int = 64) -> Engine:
    cfg = EngineConfig(cache=CacheConfig(page_size=8, num_pages=pages),
                       scheduler=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8,
                                                 max_model_len=256))
    runner = MockRunner(cfg.cache, cfg.scheduler, vocab_size=V)
    runner.warmup()
    return Engine(cfg, runner, eos_token_ids=())


def _dp(n: int = 2) -> DataParallelEngine:
    return DataParallelEngine([_engine() for _ in range(n)])


def _drain(engine, max_steps: int = 500) -> dict[str, list]:
    got: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return got
        for o in engine.step():
            got.setdefault(o.request_id, []).append(o)
    raise AssertionError("engine did not drain")


def _tokens(got: dict[str, list]) -> dict[str, list[int]]:
    return {rid: [t for o in outs for t in o.new_token_ids] for rid, outs in got.items()}


PROMPTS = [[5, 9, 200, 31, 7], list(range(1, 40)), [42], [7] * 17, [3, 1, 4, 1, 5, 9, 2, 6]]


def _add_all(engine) -> None:
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"g{i}", p, SamplingParams(temperature=0.0, max_tokens=6 + i,
                                                      ignore_eos=True))
    # Sampled without a seed (the engine derives one), with n = 2, and with an explicit seed.
    engine.add_request("s", [11, 12, 13], SamplingParams(temperature=0.9, max_tokens=5,
                                                         ignore_eos=True))
    engine.add_request("n", [21, 22], SamplingParams(temperature=0.9, max_tokens=4, n=2,
                                                     ignore_eos=True))
    engine.add_request("seeded", [31], SamplingParams(temperature=0.9, max_tokens=4, seed=77,
                                                      ignore_eos=True))


def test_replicas_share_the_work_and_give_one_engines_tokens() -> None:
    one, dp = _engine(), _dp(2)
    _add_all(one)
    _add_all(dp)
    # Least-loaded routing alternates while the loads are equal: both replicas got requests.
    assert [s.num_waiting for s in dp.replica_stats()] == [5, 4]  # "n" counts two sequences
    want, got = _tokens(_drain(one)), _tokens(_drain(dp))
    assert got == want
    for i, p in enumerate(PROMPTS):  # not vacuous: the mock's greedy rule
        assert want[f"g{i}"][0] == mock_next_token(p, V)
    assert want["seeded"][0] == mock_sampled_token(77, 0, V)
    assert set(want) == {*(f"g{i}" for i in range(5)), "s", "n#0", "n#1", "seeded"}
    assert all(s.num_steps > 0 for s in dp.replica_stats())
    stats = dp.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_pages_total == 2 * one.stats().num_pages_total
    assert dp.runner is dp.replicas[0].runner


def test_routing_prefers_the_less_loaded_replica() -> None:
    dp = _dp(2)
    dp.add_request("big", [1, 2, 3], SamplingParams(max_tokens=4, n=3))
    for i in range(3):  # replica 1 has 0 sequences, then 1, 2, then both have 3
        dp.add_request(f"r{i}", [4, 5], SamplingParams(max_tokens=4))
    assert [s.num_waiting for s in dp.replica_stats()] == [3, 3]
    dp.add_request("tie", [6], SamplingParams(max_tokens=4))
    assert [s.num_waiting for s in dp.replica_stats()] == [4, 3]


def test_request_ids_are_unique_across_replicas() -> None:
    dp = _dp(2)
    dp.add_request("a", [1, 2], SamplingParams(max_tokens=4))
    dp.add_request("b", [1, 2], SamplingParams(max_tokens=4, n=2))  # replica 1: b#0, b#1
    for rid, n in (("a", 1), ("b", 1), ("b#1", 1), ("a", 2)):
        with pytest.raises(ValueError, match="request_id=.*already in use"):
            dp.add_request(rid, [3], SamplingParams(max_tokens=4, n=n))
    with pytest.raises(ValueError, match="prompt_token_ids"):  # the replica's own checks
        dp.add_request("c", [], SamplingParams(max_tokens=4))
    assert sum(s.num_waiting for s in dp.replica_stats()) == 3


def test_abort_reaches_the_replica_that_holds_the_request() -> None:
    dp = _dp(2)
    dp.add_request("a", [1, 2], SamplingParams(max_tokens=50, ignore_eos=True))
    dp.add_request("b", [3, 4], SamplingParams(max_tokens=5, ignore_eos=True))
    dp.step()
    dp.abort("b")  # on replica 1
    got = _drain(dp)
    assert got["b"][-1].finish_reason == "abort"
    assert got["a"][-1].finish_reason == "length"
    assert sum(len(o.new_token_ids) for o in got["a"]) == 50 - 1  # one token came from step 1
    assert dp.stats().num_pages_used == 0


def test_a_failing_replica_ends_only_its_own_requests() -> None:
    dp = _dp(2)
    for rid in ("a", "b", "c", "d"):  # a, c on replica 0; b, d on replica 1
        dp.add_request(rid, [1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True))
    broken = dp.replicas[1].runner

    def boom(*args, **kwargs):
        raise RuntimeError("device lost")
    broken.execute_async = boom
    got = _drain(dp)
    for rid in ("b", "d"):
        assert got[rid][-1].finish_reason == "abort"
        assert "replica 1" in got[rid][-1].error and "device lost" in got[rid][-1].error
    for rid in ("a", "c"):
        assert got[rid][-1].finish_reason == "length" and got[rid][-1].error is None
        assert sum(len(o.new_token_ids) for o in got[rid]) == 8
    assert dp.replica_stats()[1].num_pages_used == 0
    # New requests go to the replica whose step did not fail, for retry_after_s.
    assert dp.resting(1) and not dp.resting(0)
    dp.add_request("e", [5], SamplingParams(max_tokens=3, ignore_eos=True))
    dp.add_request("f", [6], SamplingParams(max_tokens=3, ignore_eos=True))
    assert [s.num_waiting for s in dp.replica_stats()] == [2, 0]
    assert _tokens(_drain(dp)).keys() == {"e", "f"}
    # Then it gets requests again (here: healed), and serves them.
    dp.retry_after_s = 0.0
    del broken.execute_async  # the instance attribute: the class's method again
    dp.add_request("h", [8], SamplingParams(max_tokens=3, ignore_eos=True))
    dp.add_request("i", [9], SamplingParams(max_tokens=3, ignore_eos=True))
    assert [s.num_waiting for s in dp.replica_stats()] == [1, 1]
    done = _drain(dp)
    assert all(done[r][-1].finish_reason == "length" for r in ("h", "i"))
    dp.retry_after_s = 10.0
    broken.execute_async = boom
    # Every busy replica failing is the step failing.
    dp.replicas[0].runner.execute_async = boom
    dp.add_request("g", [7], SamplingParams(max_tokens=3))
    with pytest.raises(RuntimeError, match="device lost"):
        dp.step()
    assert not dp.has_work()


def test_abort_finals_survive_a_failed_step() -> None:
    """An abort's final output comes from the next step; if that step fails, fail_all returns
    it (with the error finals of the live requests), not lost."""
    dp = _dp(2)
    dp.add_request("a", [1, 2], SamplingParams(max_tokens=8, ignore_eos=True))  # replica 0
    dp.add_request("b", [3, 4], SamplingParams(max_tokens=8, ignore_eos=True))  # replica 1
    dp.add_request("c", [5, 6], SamplingParams(max_tokens=8, ignore_eos=True))  # replica 0
    dp.step()
    dp.abort("c")

    def boom(*args, **kwargs):
        raise RuntimeError("device lost")
    dp.replicas[0].runner.execute_async = boom
    got = {o.request_id: o for o in dp.step() if o.finished}
    assert got["c"].finish_reason == "abort" and got["c"].error is None  # the user's abort
    assert got["a"].finish_reason == "abort" and "device lost" in got["a"].error
    assert "b" not in got
    assert dp.replica_stats()[0].num_pages_used == 0


def test_needs_two_replicas() -> None:
    with pytest.raises(ValueError, match="replicas: 1 given"):
        DataParallelEngine([_engine()])
