"""The native xlaserve.v1 service against a mock engine: streaming, parity, invalid input."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from mock_engine import make_engine, offline_generate
from xlaserve.runtime.request import SamplingParams
from xlaserve.serve.client import XlaserveClient, build_generate_request
from xlaserve.serve.proto.messages import NATIVE_SERVICE, Stub, protos

PROMPTS = [f"The {w} sat on the mat number {i}." for i, w in
           enumerate(["cat", "dog", "bird", "fish"] * 4)]


async def _stream_all(target: str, requests: list[Any]) -> list[tuple[list[int], str, Any]]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = Stub(channel, NATIVE_SERVICE)

        async def one(req: Any) -> tuple[list[int], str, Any]:
            ids: list[int] = []
            text: list[str] = []
            final = None
            async for resp in stub.Generate(req, timeout=60):
                ids.extend(resp.delta.token_ids)
                text.append(resp.delta.text)
                if resp.HasField("final"):
                    final = resp.final
            return ids, "".join(text), final

        return await asyncio.gather(*(one(r) for r in requests))


def test_concurrent_streams_match_offline(mock_server: Any, tokenizer: Any) -> None:
    reqs = [build_generate_request(p, stream=True, max_tokens=12, temperature=0.0)
            for p in PROMPTS]
    results = asyncio.run(_stream_all(mock_server.target, reqs))
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    pb = protos().native
    for prompt, (ids, text, final) in zip(PROMPTS, results, strict=True):
        want_ids, want_text = offline_generate(make_engine(tokenizer=tokenizer),
                                               tokenizer.encode(prompt), sp)
        assert ids == want_ids and text == want_text
        assert final is not None and final.completion_tokens == len(ids)
        assert final.prompt_tokens == len(tokenizer.encode(prompt))
        assert final.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
        assert final.timings.end_to_end_s >= final.timings.time_to_first_token_s > 0


def test_data_parallel_engine_serves_the_same_streams(start_server: Any, tokenizer: Any) -> None:
    """The server over a DataParallelEngine of two replicas: each stream equals one engine's."""
    from xlaserve.runtime.data_parallel import DataParallelEngine

    def factory() -> DataParallelEngine:
        return DataParallelEngine([make_engine(tokenizer=tokenizer).inner for _ in range(2)])
    server = start_server(factory)
    reqs = [build_generate_request(p, stream=True, max_tokens=10, temperature=0.0)
            for p in PROMPTS[:8]]
    results = asyncio.run(_stream_all(server.target, reqs))
    sp = SamplingParams(max_tokens=10, temperature=0.0)
    for prompt, (ids, text, final) in zip(PROMPTS[:8], results, strict=True):
        assert (ids, text) == offline_generate(make_engine(tokenizer=tokenizer),
                                               tokenizer.encode(prompt), sp)
        assert final is not None and final.completion_tokens == len(ids) == 10
    engine = server.server.bridge.engine
    assert all(s.num_steps > 0 for s in engine.replica_stats())


def test_unary_style_chat_and_token_ids(mock_server: Any, tokenizer: Any) -> None:
    with XlaserveClient(mock_server.target, timeout_s=30) as c:
        a = c.generate(token_ids=tokenizer.encode("hello"), max_tokens=5, temperature=0.0)
        b = c.generate("hello", max_tokens=5, temperature=0.0)
        assert a.token_ids == b.token_ids and len(a.token_ids) == a.completion_tokens
        chat = c.generate(messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                          temperature=0.0)
        prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user",
                                                                  "content": "hi"}]),
                                  add_special_tokens=False)
        assert chat.prompt_tokens == len(prompt)
        samples = c.generate_all("hello", max_tokens=3, temperature=1.0, seed=1, n=3)
        assert [s.index for s in samples] == [0, 1, 2]
        assert all(s.completion_tokens == 3 for s in samples)


def test_model_info_tokenize_detokenize(mock_server: Any, tokenizer: Any) -> None:
    with XlaserveClient(mock_server.target, timeout_s=30) as c:
        info = c.model_info()
        assert info.model == "mock" and info.context_length == 256
        assert info.vocab_size == tokenizer.vocab_size
        assert list(info.token_buckets) == [16, 32, 64, 128] and info.seq_buckets[0] == 8
        ids = c.tokenize("hello world")
        assert ids == tokenizer.encode("hello world")
        assert c.detokenize(ids) == tokenizer.decode(ids)
        assert c.health() == "SERVING"
        assert c.health(NATIVE_SERVICE) == "SERVING"


def _invalid_cases(tokenizer: Any) -> list[tuple[str, dict[str, Any], str]]:
    return [
        ("empty text", {"prompt": ""}, "text"),
        ("empty token ids", {"token_ids": []}, "token_ids: the prompt is empty"),
        ("empty chat", {"messages": []}, "chat: no messages"),
        ("prompt too long", {"token_ids": [3] * 300}, "context length"),
        ("token out of vocab", {"token_ids": [10**6]}, "vocabulary"),
        ("max_tokens < 1", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("temperature < 0", {"prompt": "hi", "temperature": -0.5}, "temperature"),
        ("top_p = 0", {"prompt": "hi", "top_p": 0.0}, "top_p"),
        ("top_p > 1", {"prompt": "hi", "top_p": 1.5}, "top_p"),
        ("top_k < -1", {"prompt": "hi", "top_k": -2}, "top_k=-2"),
        ("unknown model", {"prompt": "hi", "model": "gpt-9"}, "model"),
        ("oversized", {"prompt": "x" * 70_000}, "GenerateRequest"),
        ("no room for max_tokens", {"prompt": "hi", "max_tokens": 255}, "max_tokens"),
    ]


@pytest.mark.parametrize("index", range(13))
def test_invalid_fields_get_invalid_argument(start_server: Any, tokenizer: Any,
                                             index: int) -> None:
    name, kwargs, field = _invalid_cases(tokenizer)[index]
    srv = start_server(max_request_bytes=64 * 1024)
    prompt = kwargs.pop("prompt", None)
    req = build_generate_request(prompt, stream=True, **kwargs)
    with grpc.insecure_channel(srv.target) as channel, pytest.raises(grpc.RpcError) as info:
        list(Stub(channel, NATIVE_SERVICE).Generate(req, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    assert field in info.value.details(), (name, info.value.details())


def test_cli_client(mock_server: Any, capsys: Any) -> None:
    from xlaserve.cli import main

    assert main(["client", "--target", mock_server.target, "--prompt", "hello", "--stream",
                 "--max-tokens", "5", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    import json

    summary = json.loads(out[-1])
    assert summary["completion_tokens"] == 5 and summary["finish_reason"] == "length"
    assert main(["client", "--target", mock_server.target, "--prompt", "hello",
                 "--max-tokens", "0"]) == 2
    assert "max_tokens" in capsys.readouterr().err


def test_logprobs_in_deltas(mock_server: Any) -> None:
    with XlaserveClient(mock_server.target, timeout_s=30) as c:
        resps = list(c.generate_stream("hello", max_tokens=4, temperature=0.0, logprobs=2))
    lps = [lp for r in resps for lp in r.delta.logprobs]
    ids = [t for r in resps for t in r.delta.token_ids]
    assert [lp.token_id for lp in lps] == ids
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in lps)


def test_load_failure_exits_one(tokenizer: Any) -> None:
    from xlaserve.serve.grpc_server import ServerOptions, serve_until_signal

    def broken() -> Any:
        raise RuntimeError("no such checkpoint")

    opts = ServerOptions(model_name="m", port=0, metrics_port=None)
    assert asyncio.run(asyncio.wait_for(serve_until_signal(broken, opts), 30)) == 1
