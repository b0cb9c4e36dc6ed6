"""Model-free engines for server tests: the real Engine + MockRunner + the builtin tiny tokenizer.

`TestEngine` wraps an Engine to add a per-step delay (so requests stay in flight long enough to
cancel or overload) and two poisons: a prompt equal to ADD_POISON makes add_request raise; for one
equal to STEP_POISON the detokenizer raises inside the engine's step, which must end only that
request (Engine._fail).
Also runnable as a script: ``python tests/serve/mock_engine.py PORT_FILE`` serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from xlaserve.checkpoints.builtin import builtin_model_dir
from xlaserve.checkpoints.tokenizer import Tokenizer
from xlaserve.runtime.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from xlaserve.runtime.engine import Engine
from xlaserve.runtime.mock_runner import MockRunner
from xlaserve.runtime.output import default_detokenizer_factory

ADD_POISON = [5, 5, 5, 5, 5]
STEP_POISON = [6, 6, 6, 6, 6]


class PoisonedDetokenizer:
    """Raises on the first tokens, as a broken detokenizer of one request would."""

    def add(self, ids: Any) -> str:
        raise RuntimeError("poisoned request: detokenizer failed")

    def flush(self) -> str:
        return ""


def poisoning_factory(tokenizer: Tokenizer) -> Any:
    """The tokenizer's detokenizers, except for STEP_POISON prompts."""
    normal = default_detokenizer_factory(tokenizer)

    def make(prompt_ids: Any) -> Any:
        return PoisonedDetokenizer() if list(prompt_ids) == STEP_POISON else normal(prompt_ids)
    return make


class TestEngine:
    """Delegates to an Engine; adds a step delay and the poisons."""

    __test__ = False  # not a pytest class

    def __init__(self, engine: Engine, step_delay_s: float = 0.0) -> None:
        self.inner = engine
        self.step_delay_s = step_delay_s

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: Any) -> None:
        if list(prompt_token_ids) == ADD_POISON:
            raise RuntimeError("add_request poisoned")
        self.inner.add_request(request_id, prompt_token_ids, sampling)

    def step(self) -> list[Any]:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        return self.inner.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(builtin_model_dir("tiny"))


def make_engine(*, step_delay_s: float = 0.0, num_pages: int = 128, max_num_seqs: int = 64,
                max_num_batched_tokens: int = 128, max_model_len: int = 256,
                tokenizer: Tokenizer | None = None, text: bool = True) -> TestEngine:
    """A warmed-up mock engine whose vocabulary is the tiny tokenizer's.

    text=False: no tokenizer at all (token ids in and out), like a model dir without
    tokenizer.json.
    """
    tok = tokenizer or tiny_tokenizer()
    cache = CacheConfig(page_size=16, num_pages=num_pages)
    sched = SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                            max_num_seqs=max_num_seqs, max_model_len=max_model_len)
    config = EngineConfig(model="mock", cache=cache, scheduler=sched)
    runner = MockRunner(cache, sched, vocab_size=tok.vocab_size)
    runner.warmup()
    model_config = ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=8,
                               intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                               head_dim=8, max_position_embeddings=max_model_len)
    engine = Engine(config, runner, tokenizer=tok if text else None, model_config=model_config,
                    detokenizer_factory=poisoning_factory(tok) if text else None)
    return TestEngine(engine, step_delay_s)


def offline_generate(engine: Any, prompt_ids: list[int], sampling: Any) -> tuple[list[int], str]:
    """Runs one request to completion on an engine, in this thread; returns (ids, text)."""
    engine.add_request("offline", prompt_ids, sampling)
    ids: list[int] = []
    text: list[str] = []
    while engine.has_work():
        for o in engine.step():
            ids.extend(o.new_token_ids)
            text.append(o.new_text)
    return ids, "".join(text)


def _main(port_file: str) -> int:
    from xlaserve.serve.grpc_server import GrpcServer, ServerOptions, serve_until_signal

    def report(server: GrpcServer) -> None:
        with open(port_file, "w") as f:
            f.write(str(server.port))

    options = ServerOptions(model_name="mock", port=0, metrics_port=None, drain_timeout_s=20)
    return asyncio.run(serve_until_signal(lambda: make_engine(step_delay_s=0.02), options,
                                          on_started=report))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
