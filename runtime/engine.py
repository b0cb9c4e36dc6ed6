"""Engine: the serving loop. add_request / step / abort / has_work / stats.

One `step()` = schedule (host) -> batch.build (host) -> runner.execute (device) -> scheduler.update
(token-level stops) -> OutputProcessor (text, stop strings). Outputs are deltas (RequestOutput).

n > 1: a request with SamplingParams.n = k becomes k sequences with ids f"{id}#{i}" (i = 0..k-1),
each with n=1 and seed = seed + i (or its own derived seed). Their outputs carry the child ids;
callers map them back with ``id.rpartition("#")``. Children 1..k-1 wait until child 0 has computed
the prompt, then take its full pages from the prefix cache (shared, not recomputed).
`abort(id)` aborts all children. For n = 1 the id is used unchanged.

Seeds: a request without a seed gets one derived from the engine seed and a request counter, so a
run is reproducible; a request with a seed samples the same tokens whatever else is batched.

Overlap (async_scheduling=True, the default): while the device runs step N, the host schedules
and builds step N+1; decode rows of N+1 whose input token is N's (still unknown) sampled token get
a placeholder. N+1 is dispatched before N finishes, with each placeholder row pointing at N's
sampled ids (batch.chain_placeholders): the device reads them from N's output, so it runs N+1
right after N with no host round trip. (A placeholder with a penalty history needs the token on
the host: then the engine waits for N and writes it in, batch.fill_placeholders.) While N+1 runs,
the host applies N's tokens (scheduler.update) and makes its outputs (text, stop strings). A
request that N finishes (EOS, stop) has one wasted row in N+1, whose result is dropped.
async_scheduling=False runs schedule -> execute -> update strictly in turn.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from xlaserve.runtime import batch
from xlaserve.runtime.config import EngineConfig, ModelConfig
from xlaserve.runtime.output import DetokenizerFactory, OutputProcessor, default_detokenizer_factory
from xlaserve.runtime.request import Request, RequestOutput, RequestStatus, SamplingParams
from xlaserve.runtime.scheduler import Scheduler, SchedulerOutput

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's queues, pages and counters."""

    num_waiting: int
    num_running: int
    num_pages_total: int  # usable pages (page 0 excluded)
    num_pages_used: int
    num_pages_cached: int  # reusable, holding a cached prefix
    num_pages_free: int
    prefix_cache_queries: int  # tokens looked up at admission
    prefix_cache_hits: int  # tokens served from the prefix cache
    num_preemptions: int
    compiles_after_warmup: int
    last_step_time_s: float
    num_steps: int


class Engine:
    """Args:
      config: the engine options (the runner already reflects cache and scheduler sizes).
      runner: a ModelRunner or MockRunner (num_pages, page_size, buckets, execute).
      tokenizer: checkpoints.tokenizer.Tokenizer or None (no text; token ids only).
      model_config: the model's config (eos ids, vocab size), or None with a MockRunner.
      detokenizer_factory: overrides the tokenizer's IncrementalDetokenizer (tests).
      eos_token_ids: default: the tokenizer's, else the model config's.
      async_scheduling: build step N+1 while the device runs step N (see the module docstring).
    """

    def __init__(self, config: EngineConfig, runner: Any, *, tokenizer: Any = None,
                 model_config: ModelConfig | None = None,
                 detokenizer_factory: DetokenizerFactory | None = None,
                 eos_token_ids: tuple[int, ...] | None = None, async_scheduling: bool = True):
        self.config, self.runner, self.tokenizer, self.model_config = (
            config, runner, tokenizer, model_config)
        cache = dataclasses.replace(config.cache, page_size=runner.page_size)
        self.scheduler = Scheduler(config.scheduler, cache, runner.num_pages)
        if eos_token_ids is None:
            eos_token_ids = tuple(getattr(tokenizer, "eos_token_ids", ()) or (
                model_config.eos_token_ids if model_config else ()))
        self.eos_token_ids = eos_token_ids
        if detokenizer_factory is None and tokenizer is not None:
            detokenizer_factory = default_detokenizer_factory(tokenizer)
        self._outputs = OutputProcessor(detokenizer_factory)
        self._children: dict[str, list[str]] = {}  # parent id -> child ids (n > 1)
        self._pending: list[RequestOutput] = []  # abort outputs, returned by the next step
        self.async_scheduling = async_scheduling
        self._inflight: tuple[SchedulerOutput, Any] | None = None  # dispatched step, its handle
        self._counter = 0
        self._last_step_time = 0.0
        self._num_steps = 0

    @staticmethod
    def build_runner(config: EngineConfig, **runner_options: Any) -> tuple[Any, Any]:
        """Loads the model and builds its ModelRunner (on a mesh when parallel), not warmed up.

        With data parallelism, only the first replica's runner (they are all alike). Shared by
        `from_config` and `xlaserve profile`, so both compile the same programs.
        Returns (runner, LoadedModel).
        """
        from xlaserve.runtime.data_parallel import build_runners

        if config.parallel.data_parallel_size > 1:
            log.info("data_parallel_size=%d: building replica 0 only (every replica compiles "
                     "the same programs)", config.parallel.data_parallel_size)
        runners, loaded = build_runners(config, num_replicas=1, **runner_options)
        return runners[0], loaded

    @classmethod
    def from_config(cls, config: EngineConfig) -> Any:
        """Loads the model and tokenizer, builds the runner, warms up every bucket.

        Returns an Engine, or with ``data_parallel_size`` > 1 a DataParallelEngine of that many
        Engines (runtime/data_parallel.py), which has the same methods.
        A model directory without tokenizer.json (e.g. a config-only dir with --load-format
        dummy) serves token ids only: that is logged as a warning, and text input is refused.
        """
        from xlaserve.checkpoints.tokenizer import Tokenizer
        from xlaserve.runtime.data_parallel import DataParallelEngine, build_runners, warm_up

        runners, loaded = build_runners(config)
        warm_up(runners)
        tokenizer = None
        if (loaded.model_dir / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_dir(loaded.model_dir)
        else:
            log.warning("%s has no tokenizer.json: token ids in and out only, no text",
                        loaded.model_dir)
        engines = [cls(config, r, tokenizer=tokenizer, model_config=loaded.config)
                   for r in runners]
        return engines[0] if len(engines) == 1 else DataParallelEngine(engines)

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling: SamplingParams) -> None:
        """Queues a request. Raises ValueError naming the field (length, empty prompt, dup id)."""
        if self.has_request(request_id):
            raise ValueError(f"request_id={request_id!r}: already in use")
        vocab = self.model_config.vocab_size if self.model_config else None
        if vocab is not None and any(not 0 <= int(t) < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt_token_ids: ids must be in [0, {vocab})")
        if vocab is not None and any(t >= vocab for t, _ in sampling.logit_bias):
            raise ValueError(f"logit_bias: token ids must be in [0, {vocab}), got "
                             f"{[t for t, _ in sampling.logit_bias if t >= vocab][:5]}")
        if sampling.min_tokens > 0 and len(batch.min_tokens_stop_ids(
                sampling, self.eos_token_ids)) > batch.MAX_MIN_TOKENS_STOP_IDS:
            raise ValueError(f"stop_token_ids: with min_tokens > 0 at most "
                             f"{batch.MAX_MIN_TOKENS_STOP_IDS} stop ids (EOS included)")
        ids = [request_id] if sampling.n == 1 else [f"{request_id}#{i}" for i in range(sampling.n)]
        for rid in ids:  # before adding any, so that a failure adds nothing
            if self.has_request(rid):
                raise ValueError(f"request_id={rid!r}: already in use")
        for i, rid in enumerate(ids):
            seed = sampling.seed + i if sampling.seed is not None else (
                self.config.seed * 1_000_003 + self._counter)
            self._counter += 1
            sp = dataclasses.replace(sampling, n=1, seed=seed & 0xFFFFFFFF)
            req = Request(rid, [int(t) for t in prompt_token_ids], sp,
                          eos_token_ids=self.eos_token_ids)
            self.scheduler.add(req, wait_for=ids[0] if i else None)
            self._outputs.add(rid, req.prompt_token_ids, sp)
        if sampling.n > 1:
            self._children[request_id] = ids

    def abort(self, request_id: str) -> None:
        """Aborts a request (all its children for n > 1): pages are freed now; the final output
        (finish_reason "abort") comes from the next step(). Unknown ids are ignored."""
        kids = self._children.pop(request_id, None)
        for rid in kids if kids is not None else [request_id]:
            out = self.scheduler.abort(rid)
            self._outputs.remove(rid)
            if out is not None:
                self._pending.append(out)
                if kids is None:  # one child of an n > 1 request aborted by its own id
                    self._forget_child(rid)

    def _forget_child(self, request_id: str) -> None:
        """Drops a finished child from its parent's list (the parent id is free once empty)."""
        if "#" not in request_id:
            return
        parent = request_id.rpartition("#")[0]
        kids = self._children.get(parent)
        if kids is not None and request_id in kids:
            kids.remove(request_id)
            if not kids:
                del self._children[parent]

    def has_request(self, request_id: str) -> bool:
        """Whether the id is in use here (a live request, or the parent of live n > 1 ones)."""
        return request_id in self._children or request_id in self.scheduler.requests

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Ends every request after a failed step (its state is unknown): pages freed, the
        in-flight step dropped. Returns what the failed step had produced (abort finals of
        earlier `abort` calls included), then one final output per live request
        (finish_reason "abort", `error`). The prefix cache is emptied too: the failed step may
        have left pages registered whose K/V it never wrote."""
        self._inflight = None
        outs, self._pending = self._pending, []
        for rid in list(self.scheduler.requests):
            out = self.scheduler.abort(rid)
            self._outputs.remove(rid)
            if out is not None:
                outs.append(dataclasses.replace(out, new_text="", error=error))
        self._children.clear()
        self.scheduler.allocator.reset_prefix_cache()
        return outs

    def has_work(self) -> bool:
        return bool(self._pending) or self._inflight is not None or self.scheduler.has_work()

    def _build(self, sched_out: SchedulerOutput) -> batch.StepInputs:
        r = self.runner
        return batch.build(sched_out, page_size=r.page_size, token_buckets=r.token_buckets,
                           seq_buckets=r.seq_buckets, max_pages_per_seq=r.max_pages_per_seq,
                           max_history=self.config.scheduler.max_model_len,
                           eos_token_ids=self.eos_token_ids)

    def _launch(self, sched_out: SchedulerOutput, inputs: batch.StepInputs,
                prev: Any = None) -> tuple[SchedulerOutput, Any]:
        wanted = [s.sampling.logprobs for s in sched_out.seqs if s.sampling.logprobs is not None]
        kwargs = {} if prev is None else {"prev": prev}
        handle = self.runner.execute_async(inputs, num_logprobs=max(wanted) if wanted else None,
                                           **kwargs)
        self._num_steps += 1
        return sched_out, handle

    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the deltas of every request that produced something.

        If it raises, what it had produced (abort finals included) waits in `_pending`, and
        `fail_all` returns it.
        """
        outs, self._pending = self._pending, []
        try:
            self._step(outs)
        except BaseException:
            self._pending = outs + self._pending
            raise
        return outs

    def _step(self, outs: list[RequestOutput]) -> None:
        start = time.perf_counter()
        cur, self._inflight = self._inflight, None
        if cur is None:
            first = self.scheduler.schedule()
            cur = self._launch(first, self._build(first)) if first.seqs else None
        if cur is not None:
            sched_out, handle = cur
            nxt = self.scheduler.schedule() if self.async_scheduling else None  # device busy
            nxt_inputs = self._build(nxt) if nxt is not None and nxt.seqs else None
            if nxt is not None and nxt_inputs is not None and batch.can_chain(nxt):
                # Dispatch N+1 before N's tokens reach the host: the device takes them from N's
                # output, so it runs N+1 right after N with no host round trip in between.
                nxt_inputs = batch.chain_placeholders(nxt_inputs, nxt, sched_out)
                self._inflight = self._launch(nxt, nxt_inputs, prev=handle)
                res = handle.result()
            else:
                res = handle.result()
                if nxt is not None and nxt_inputs is not None:  # keep the device busy first
                    batch.fill_placeholders(nxt_inputs, nxt, sched_out, res.sampled_token_ids)
                    self._inflight = self._launch(nxt, nxt_inputs)
            # While the next step runs: apply this step's tokens, then text and stop strings.
            deltas = self.scheduler.update(sched_out, res.sampled_token_ids, res.logprobs,
                                           res.top_logprob_ids, res.top_logprobs)
            for delta in deltas:
                try:
                    out, stop = self._outputs.process(delta)
                except Exception as e:  # noqa: BLE001 - one request's text failed: only it ends
                    out, stop = self._fail(delta, e), None
                if stop is not None and not delta.finished:
                    self.scheduler.finish(delta.request_id, RequestStatus.FINISHED_STOPPED, stop)
                if out.finished:
                    # Only here, not for `_pending` abort outputs: abort() already forgot those
                    # children, and the parent id may have been reused since.
                    self._forget_child(out.request_id)
                outs.append(out)
        self._last_step_time = time.perf_counter() - start

    def _fail(self, delta: RequestOutput, error: Exception) -> RequestOutput:
        """Ends one request whose output processing raised: pages freed, an error final."""
        log.exception("request %s failed in output processing", delta.request_id)
        self.scheduler.abort(delta.request_id)
        self._outputs.remove(delta.request_id)
        return dataclasses.replace(delta, new_text="", finished=True, finish_reason="abort",
                                   error=f"{type(error).__name__}: {error}")

    def stats(self) -> EngineStats:
        s, a = self.scheduler, self.scheduler.allocator
        return EngineStats(
            num_waiting=len(s.waiting), num_running=len(s.running),
            num_pages_total=a.num_total, num_pages_used=a.num_used,
            num_pages_cached=a.num_cached, num_pages_free=a.num_free,
            prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            compiles_after_warmup=int(self.runner.compiles_after_warmup),
            last_step_time_s=self._last_step_time, num_steps=self._num_steps)
