"""Offline API: ``xlaserve.LLM(model=..., **engine options).generate(...)`` and ``.chat(...)``.

Runs the Engine loop in the caller's thread until every request is done and returns results in
input order. `LLM.stream` is the incremental form the batch CLI uses: it yields each result as soon
as all its samples finish.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from xlaserve.runtime.engine import Engine
from xlaserve.runtime.output import Completion
from xlaserve.runtime.request import SamplingParams

if TYPE_CHECKING:
    from xlaserve.runtime.data_parallel import DataParallelEngine

PromptInput = str | Sequence[int]


@dataclasses.dataclass
class GenerationOutput:
    """All samples of one prompt."""

    request_id: str
    prompt: str | None  # None when the prompt was given as token ids
    prompt_token_ids: list[int]
    outputs: list[Completion]  # n samples, index order

    @property
    def text(self) -> str:
        """The first sample's text."""
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclasses.dataclass
class PreparedRequest:
    """One prompt ready for the engine (what `stream` takes)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    prompt: str | None = None


class LLM:
    """Offline generation over one Engine.

    Args:
      model: HF directory, converted directory or builtin:NAME.
      engine: an already built Engine (tests with MockRunner); then no options may be given.
      **options: engine options (see xlaserve.engine_args.OPTION_NAMES), e.g. max_num_seqs=16.
    """

    def __init__(self, model: str = "builtin:tiny", *, engine: Engine | None = None,
                 **options: Any):
        # Engine.from_config gives a DataParallelEngine (same methods) for data_parallel_size > 1.
        self.engine: Engine | DataParallelEngine
        if engine is None:
            from xlaserve.engine_args import engine_config_from_options

            self.engine = Engine.from_config(engine_config_from_options(model, **options))
        elif options:
            raise ValueError(f"{sorted(options)[0]}: engine options cannot be combined with "
                             "engine=")
        else:
            self.engine = engine
        self._counter = 0

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def _encode(self, prompt: object) -> tuple[list[int], str | None]:
        """Token ids (and the text) of one prompt; anything but a str or token ids raises."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: a text prompt needs a tokenizer; pass token ids")
            return list(self.tokenizer.encode(prompt)), prompt
        if not isinstance(prompt, Sequence) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"prompt={prompt!r}: must be a str or a list of token ids")
        return list(prompt), None

    def _prepare(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None
                 ) -> list[PreparedRequest]:
        # One prompt (text or token ids) or a batch of them; `_encode` checks each item.
        batch: list[object]
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                         and all(isinstance(t, int) for t in prompts)):
            batch = [prompts]
        else:
            batch = list(prompts)
        if sampling_params is None:
            params = [SamplingParams()] * len(batch)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(batch)
        else:
            params = list(sampling_params)
            if len(params) != len(batch):
                raise ValueError(f"sampling_params: {len(params)} given for {len(batch)} "
                                 "prompts")
        out = []
        for p, sp in zip(batch, params):
            ids, text = self._encode(p)
            self._counter += 1
            out.append(PreparedRequest(f"llm-{self._counter}", ids, sp, text))
        return out

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[GenerationOutput]:
        """Generates for every prompt (text or token ids); results in input order."""
        reqs = self._prepare(prompts, sampling_params)
        done = {r.request_id: r for r in self.stream(reqs)}
        return [done[r.request_id] for r in reqs]

    def chat(self, conversations: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str,
                                                                                         Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             **template_kwargs: Any) -> list[GenerationOutput]:
        """Applies the tokenizer's chat template to each conversation, then generates."""
        convs: Sequence[Sequence[Mapping[str, Any]]]
        if conversations and isinstance(conversations[0], Mapping):  # one conversation
            convs = [cast(Sequence[Mapping[str, Any]], conversations)]
        else:
            convs = cast(Sequence[Sequence[Mapping[str, Any]]], conversations)
        if self.tokenizer is None:
            raise ValueError("conversations: chat needs a tokenizer")
        prompts = [self.tokenizer.apply_chat_template(
            list(c), add_generation_prompt, chat_template=chat_template, **template_kwargs)
            for c in convs]
        return self.generate(prompts, sampling_params)

    def stream(self, requests: Iterable[PreparedRequest],
               on_step: Callable[[int], None] | None = None,
               on_error: Callable[[PreparedRequest, ValueError], None] | None = None
               ) -> Iterator[GenerationOutput]:
        """Adds `requests` to the engine and yields each result as soon as all its samples finish.

        Args:
          requests: prepared requests (ids unique among those in flight).
          on_step: called after each engine step with the number of new tokens (progress bars).
          on_error: called for a request the engine rejects (then it is skipped); None: raise.
        Raises:
          ValueError: from Engine.add_request (the message names the field), without on_error.
        """
        engine = self.engine
        pending: dict[str, GenerationOutput] = {}
        for r in requests:
            try:
                engine.add_request(r.request_id, r.prompt_token_ids, r.sampling)
            except ValueError as e:
                if on_error is None:
                    for rid in pending:
                        engine.abort(rid)
                    raise
                on_error(r, e)
                continue
            n = r.sampling.n
            pending[r.request_id] = GenerationOutput(
                r.request_id, r.prompt, r.prompt_token_ids,
                [Completion(r.request_id if n == 1 else f"{r.request_id}#{i}") for i in range(n)])
        try:
            while pending:
                outs = engine.step()
                new_tokens = 0
                for out in outs:
                    base, _, idx = out.request_id.rpartition("#")
                    gen = pending.get(out.request_id) or pending.get(base)
                    if gen is None:
                        continue
                    index = int(idx) if gen.request_id == base else 0
                    gen.outputs[index].add(out)
                    new_tokens += len(out.new_token_ids)
                    if all(c.finished for c in gen.outputs):
                        del pending[gen.request_id]
                        yield gen
                if on_step is not None:
                    on_step(new_tokens)
                if not outs and not engine.has_work() and pending:
                    raise RuntimeError(f"engine idle with {len(pending)} requests unfinished")
        finally:
            for rid in list(pending):  # the caller stopped early: free what is left
                engine.abort(rid)
