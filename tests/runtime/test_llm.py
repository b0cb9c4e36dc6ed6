"""Offline API: xlaserve.LLM.generate / chat, input order, n > 1, errors."""

from __future__ import annotations

import random

import pytest

from xlaserve.runtime.config import CacheConfig, EngineConfig, SchedulerConfig
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.llm import LLM
from xlaserve.runtime.mock_runner import MockRunner, mock_next_token
from xlaserve.runtime.request import SamplingParams

V = 1000


def mock_llm():
    cfg = EngineConfig(cache=CacheConfig(page_size=8, num_pages=64),
                       scheduler=SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4,
                                                 max_model_len=128))
    runner = MockRunner(cfg.cache, cfg.scheduler, vocab_size=V)
    runner.warmup()
    return LLM(engine=Engine(cfg, runner))


def reference(prompt, n):
    ctx = list(prompt)
    for _ in range(n):
        ctx.append(mock_next_token(ctx, V))
    return ctx[len(prompt):]


def test_generate_token_ids_in_input_order_with_per_prompt_params():
    llm = mock_llm()
    prompts = [[i + 1] * (40 - 3 * i) for i in range(10)]  # long ones first: they finish last
    params = [SamplingParams(temperature=0, max_tokens=1 + i) for i in range(10)]
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [reference(p, 1 + i) for i, p in enumerate(prompts)]
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(o.finish_reason == "length" for o in outs)
    one = llm.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=3))  # a single prompt
    assert len(one) == 1 and one[0].token_ids == reference([5, 6, 7], 3)


def test_n_samples_and_errors():
    llm = mock_llm()
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=1.0, max_tokens=4, n=3, seed=5))[0]
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) == 3
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([[1], [2]], [SamplingParams()])
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text needs a tokenizer")
    with pytest.raises(ValueError, match="prompt=3"):  # a batch item neither text nor ids
        llm.generate([[1, 2], 3])
    # The second prompt is refused after the first was added: the first is aborted, not left
    # running unseen (its abort final is the only output; then the engine is idle).
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1, 2], [1] * 120], SamplingParams(max_tokens=20))
    assert not llm.engine.scheduler.requests and llm.engine.stats().num_pages_used == 0
    outs = llm.engine.step()
    assert [(o.finish_reason, o.new_token_ids) for o in outs] == [("abort", ())]
    assert not llm.engine.has_work()
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(engine=llm.engine, max_num_seqs=3)
    with pytest.raises(ValueError, match="bogus"):
        from xlaserve.engine_args import engine_config_from_options
        engine_config_from_options("builtin:tiny", bogus=1)


@pytest.fixture(scope="module")
def tiny():
    return LLM("builtin:tiny", dtype="float32", max_num_batched_tokens=64, max_num_seqs=16,
               max_model_len=128, page_size=8, num_pages=96)


def test_generate_text_and_chat_on_tiny_model(tiny):
    import xlaserve

    assert xlaserve.LLM is LLM
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["Hello there", "The capital of France is", "one two three"]
    outs = tiny.generate(prompts, greedy)
    alone = [tiny.generate(p, greedy)[0] for p in prompts]
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    assert [o.prompt for o in outs] == prompts
    compared = 0
    for o in outs:
        assert o.prompt_token_ids == tiny.tokenizer.encode(o.prompt)
        assert len(o.token_ids) == 8 and o.text
        full = tiny.tokenizer.decode(o.token_ids)
        if "\ufffd" not in full:  # random byte tokens may be invalid UTF-8 (counted differently)
            assert o.text == full
            compared += 1
    assert compared >= 1  # the text check above ran (today: "one two three")
    conv = [{"role": "user", "content": "hi"}]
    chat = tiny.chat(conv, greedy)[0]
    want = tiny.tokenizer.encode(tiny.tokenizer.apply_chat_template(conv))
    assert chat.prompt_token_ids == want
    two = tiny.chat([conv, [{"role": "user", "content": "bye"}]], greedy)
    assert len(two) == 2 and two[0].token_ids == chat.token_ids


def test_penalties_and_logprobs_on_tiny_model(tiny):
    prompts = ["Hello there", "The capital of France is", "one two three"]
    pen = SamplingParams(temperature=0, max_tokens=10, repetition_penalty=1.5,
                         frequency_penalty=0.5, ignore_eos=True, logprobs=3)
    outs = tiny.generate(prompts, pen)
    alone = [tiny.generate(p, pen)[0] for p in prompts]
    assert [o.token_ids for o in outs] == [a.token_ids for a in alone]
    # Async scheduling fills the penalty history of placeholder rows: same tokens as sync.
    rng = random.Random(0)
    ids = [[rng.randrange(3, 600) for _ in range(rng.randint(2, 20))] for _ in range(16)]
    rep = SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.5, ignore_eos=True)
    overlapped = tiny.generate(ids, rep)
    tiny.engine.async_scheduling = False
    try:
        sync = tiny.generate(ids, rep)
    finally:
        tiny.engine.async_scheduling = True
    assert [o.token_ids for o in overlapped] == [s.token_ids for s in sync]
    plain = tiny.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in outs] != [p.token_ids for p in plain]  # penalties took effect
    for o in outs:
        lps = o.outputs[0].logprobs
        assert [lp.token_id for lp in lps] == o.token_ids
        for lp in lps:
            assert lp.logprob <= 0 and len(lp.top) == 3
            assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert tiny.engine.stats().compiles_after_warmup == 0


@pytest.mark.slow
def test_tensor_parallel_engine_matches_single_device():
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    opts = dict(dtype="float32", max_num_batched_tokens=32, max_num_seqs=8, max_model_len=64,
                page_size=8, num_pages=32)
    prompts = ["Hello there", "one two three"]
    tp = LLM("builtin:tiny", tensor_parallel_size=2, **opts).generate(prompts, greedy)
    one = LLM("builtin:tiny", **opts).generate(prompts, greedy)
    assert [o.token_ids for o in tp] == [o.token_ids for o in one]
