"""Continuous-batching scheduler: which tokens of which requests run in the next step.

One token budget per step (max_num_batched_tokens) and a cap on live sequences (max_num_seqs).
Each running request's computed-token count chases its total token count (prompt + outputs), so
chunked prefill, decode and recompute after preemption are the same code path (vLLM v1's idea).
Decode rows come first in a step, then partial prefills, then newly admitted requests in arrival
order (FCFS: a request that does not fit blocks the ones behind it). When pages run out the newest
running request is preempted: its pages are released and it goes back to the front of the queue
to be recomputed later (with prefix caching most of it is a cache hit).

Token-level stop conditions (EOS, stop token ids, max_tokens, max_model_len) are checked here; stop
strings need text and are checked by runtime/output.py, which calls `finish`.

Async scheduling (one step ahead). `schedule` advances each request's computed count at once, and
a step that samples leaves one token "in flight" until `update` learns it. So step N+1 can be
scheduled while step N runs: a request whose next input token is still in flight gets one decode
row whose token is a placeholder (`ScheduledSeq.placeholder`); the engine fills it from step N's
sampled ids before dispatching N+1. Results of a step for a request that was preempted, aborted
or finished meanwhile are dropped (`ScheduledSeq.generation` tells a recomputed request apart).
Pages may be released while a dispatched step still writes to them: device steps run in order, so
a new owner's writes and reads come after those stale writes.

This module must never import jax (a test asserts it).
"""

from __future__ import annotations

import collections
import dataclasses
import time
import numpy as np

from xlaserve.runtime.config import CacheConfig, SchedulerConfig, pages_needed
from xlaserve.runtime.kv_pages import PageAllocator, PageHash
from xlaserve.runtime.request import (Request, RequestOutput, RequestStatus, SamplingParams,
                                      TokenLogprobs)


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step: a snapshot, independent of later mutation of the Request."""

    request_id: str
    token_ids: tuple[int, ...]  # the new tokens computed this step (a prefill chunk or 1 decode)
    start_position: int  # position of token_ids[0] (= computed tokens before the step)
    page_ids: tuple[int, ...]  # all pages of the sequence, enough for start + len(token_ids)
    samples: bool  # the chunk reaches the sequence's last token, so its sampled token is kept
    sampling: SamplingParams  # seed always set (the engine derives one when the request had none)
    output_position: int  # index in the output of the token this step samples
    placeholder: bool = False  # token_ids[-1] is the previous step's sampled token, not yet known
    generation: int = 0  # new at each preemption (and re-add); results of another are dropped
    # Token history for penalties; None unless the request uses a penalty.
    prompt_token_ids: tuple[int, ...] | None = None
    output_token_ids: tuple[int, ...] | None = None

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """What one step runs. Decode rows first; `seqs` order is the row order of the step."""

    seqs: tuple[ScheduledSeq, ...]
    preempted_ids: tuple[str, ...] = ()

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


def _uses_penalty(sp: SamplingParams) -> bool:
    return (sp.repetition_penalty != 1.0 or sp.presence_penalty != 0.0
            or sp.frequency_penalty != 0.0)


class Scheduler:
    """Waiting and running queues over one PageAllocator.

    Args:
      sched_cfg: token budget, sequence cap and max_model_len.
      cache_cfg: page size and prefix caching switch.
      num_pages: pages in the KV cache including page 0 (the runner decides it).
    """

    def __init__(self, sched_cfg: SchedulerConfig, cache_cfg: CacheConfig, num_pages: int):
        self.cfg = sched_cfg
        self.page_size = cache_cfg.page_size
        self.allocator = PageAllocator(num_pages, cache_cfg.page_size,
                                       enable_prefix_caching=cache_cfg.enable_prefix_caching)
        self.max_pages_per_seq = pages_needed(sched_cfg.max_model_len, cache_cfg.page_size)
        self.requests: dict[str, Request] = {}
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # admission order; the tail is preempted first
        self._hashes: dict[str, list[PageHash]] = {}
        # n > 1: child id -> the sibling Request whose prompt it waits for. The object, not its id:
        # an id can be reused once that sibling ended, and a newcomer must not hold the child.
        self._leader: dict[str, Request] = {}
        self._inflight: dict[str, int] = {}  # request id -> sampled tokens not yet known (0 or 1)
        # request id -> generation, unique over the scheduler's life: bumped at each preemption,
        # and a re-added id (abort then add) never reuses one, so stale results never match.
        self._generation: dict[str, int] = {}
        self._next_generation = 0
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of which served by cached pages
        self.num_preemptions = 0

    # ---- requests in and out ------------------------------------------------------------------
    def add(self, req: Request, *, wait_for: str | None = None) -> None:
        """Queues a request. Raises ValueError naming the field if it can never run.

        Args:
          req: a new request (status WAITING, nothing computed).
          wait_for: id of a sibling (n > 1) whose prompt must be computed first, so that this
            request finds the prompt's full pages in the prefix cache instead of recomputing them.
            Only that request, while it lives, holds this one (an unknown id holds nothing).
        """
        if req.request_id in self.requests:
            raise ValueError(f"request_id={req.request_id!r}: already in use")
        if not req.prompt_token_ids:
            raise ValueError("prompt_token_ids=[]: the prompt must have at least one token")
        total = req.num_prompt_tokens + req.sampling.max_tokens
        if req.num_prompt_tokens >= self.cfg.max_model_len or total > self.cfg.max_model_len:
            raise ValueError(
                f"prompt_token_ids: {req.num_prompt_tokens} prompt tokens + max_tokens="
                f"{req.sampling.max_tokens} exceeds max_model_len={self.cfg.max_model_len}")
        if pages_needed(total, self.page_size) > self.allocator.num_total:
            raise ValueError(
                f"prompt_token_ids: {total} tokens need {pages_needed(total, self.page_size)} "
                f"pages but the KV cache has only {self.allocator.num_total} (num_pages)")
        self.requests[req.request_id] = req
        self._hashes[req.request_id] = []
        self._inflight[req.request_id] = 0
        self._generation[req.request_id] = self._new_generation()
        if wait_for is not None and wait_for in self.requests:
            self._leader[req.request_id] = self.requests[wait_for]
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish(self, request_id: str, status: RequestStatus,
               stop_reason: str | int | None = None) -> Request | None:
        """Ends a request (stop string, abort, ...): releases its pages at once. None if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.allocator.release(req.page_ids)
        req.page_ids = []
        req.status = status
        req.finish_time = time.monotonic()
        if stop_reason is not None:
            req.stop_reason = stop_reason
        for d in (self._hashes, self._leader, self._inflight, self._generation):
            d.pop(request_id, None)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        """Aborts a waiting or running request; returns its final output (None if unknown)."""
        req = self.finish(request_id, RequestStatus.FINISHED_ABORTED)
        if req is None:
            return None
        return RequestOutput(request_id, (), "", True, "abort",
                             num_prompt_tokens=req.num_prompt_tokens,
                             num_output_tokens=len(req.output_token_ids),
                             num_cached_tokens=req.num_cached_tokens)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Picks this step's tokens: claims pages, moves queues, advances computed counts."""
        budget = self.cfg.max_num_batched_tokens
        scheduled: dict[str, int] = {}  # request id -> new tokens, in row order
        preempted: list[str] = []
        todo = [(self._total(r) - r.num_computed_tokens, r) for r in self.running
                if not self._skip(r)]
        decodes = [r for k, r in todo if k == 1]
        prefills = [r for k, r in todo if k > 1]
        for req in decodes + prefills:
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(self._total(req) - req.num_computed_tokens, budget)
            while not self._grow(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                budget += scheduled.pop(victim.request_id, 0)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status == RequestStatus.RUNNING:
                scheduled[req.request_id] = n
                budget -= n
        if not preempted:
            budget = self._admit(budget, scheduled)
        seqs = tuple(self._snapshot(self.requests[rid], n) for rid, n in scheduled.items())
        return SchedulerOutput(seqs, tuple(preempted))

    def _total(self, req: Request) -> int:
        """Tokens of the request including the one in flight."""
        return req.num_tokens + self._inflight[req.request_id]

    def _skip(self, req: Request) -> bool:
        """Nothing to schedule: two tokens in flight (only one step ahead is supported), or the
        in-flight token will end the request by length."""
        inflight = self._inflight[req.request_id]
        return inflight > 1 or inflight > 0 and (
            len(req.output_token_ids) + inflight >= req.sampling.max_tokens
            or self._total(req) >= self.cfg.max_model_len)

    def _grow(self, req: Request, num_tokens: int) -> bool:
        need = pages_needed(num_tokens, self.page_size) - len(req.page_ids)
        if need <= 0:
            return True
        new = self.allocator.allocate(need)
        if new is None:
            return False
        req.page_ids.extend(new)
        return True

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.allocator.release(req.page_ids)
        req.page_ids = []
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        self._hashes[req.request_id] = []
        self._inflight[req.request_id] = 0
        self._generation[req.request_id] = self._new_generation()
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    def _new_generation(self) -> int:
        self._next_generation += 1
        return self._next_generation

    def _held(self, req: Request) -> bool:
        """A sibling waits until its leader's full prompt pages are in the prefix cache."""
        leader = self._leader.get(req.request_id)
        if (leader is None or self.requests.get(leader.request_id) is not leader
                or not self.allocator.enable_prefix_caching):
            return False  # no leader, or it ended (its id may belong to a new request now)
        return len(self._hashes[leader.request_id]) < leader.num_prompt_tokens // self.page_size

    def _admit(self, budget: int, scheduled: dict[str, int]) -> int:
        L = self.page_size
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            if self._held(req):
                break
            tokens = req.all_token_ids
            pages, hashes = self.allocator.find_prefix(tokens, req.num_tokens - 1)
            self.allocator.acquire(pages)
            computed = len(pages) * L
            n = min(req.num_tokens - computed, budget)
            new = self.allocator.allocate(pages_needed(computed + n, L) - len(pages))
            if new is None:
                self.allocator.release(pages)
                break
            self.waiting.popleft()
            self._leader.pop(req.request_id, None)
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = computed
            self.prefix_cache_queries += req.num_tokens
            self.prefix_cache_hits += computed
            req.page_ids = pages + new
            req.num_computed_tokens = computed
            self._hashes[req.request_id] = hashes
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled[req.request_id] = n
            budget -= n
        return budget

    def _snapshot(self, req: Request, n: int) -> ScheduledSeq:
        """Freezes the request's share of the step and advances its computed count."""
        rid = req.request_id
        start = req.num_computed_tokens
        p = req.num_prompt_tokens
        placeholder = start + n > req.num_tokens  # the in-flight token: filled by the engine
        end = min(start + n, req.num_tokens)
        if end <= p:
            new = tuple(req.prompt_token_ids[start:end])
        else:
            new = tuple(req.prompt_token_ids[start:]) + tuple(
                req.output_token_ids[max(start - p, 0):end - p])
        if placeholder:
            new += (0,)
        samples = start + n == self._total(req)
        penal = _uses_penalty(req.sampling)
        seq = ScheduledSeq(
            request_id=rid, token_ids=new, start_position=start, page_ids=tuple(req.page_ids),
            samples=samples, sampling=req.sampling,
            output_position=len(req.output_token_ids) + self._inflight[rid],
            placeholder=placeholder, generation=self._generation[rid],
            prompt_token_ids=tuple(req.prompt_token_ids) if penal else None,
            output_token_ids=tuple(req.output_token_ids) if penal else None)
        req.num_computed_tokens += n
        if samples:
            self._inflight[rid] += 1
        return seq

    # ---- results ------------------------------------------------------------------------------
    def update(self, out: SchedulerOutput, sampled_token_ids: np.ndarray,
               logprobs: np.ndarray | None = None, top_logprob_ids: np.ndarray | None = None,
               top_logprobs: np.ndarray | None = None) -> list[RequestOutput]:
        """Applies a step's sampled tokens: advances computed counts, checks token-level stops.

        Args:
          out: the SchedulerOutput the step ran.
          sampled_token_ids: i32[S_bucket]; row i belongs to out.seqs[i].
          logprobs, top_logprob_ids, top_logprobs: f32[S], i32[S, n], f32[S, n] or None.
        Returns:
          One delta RequestOutput (text empty) per request that sampled a token; requests that
          finished here are already released.
        """
        results = []
        for i, seq in enumerate(out.seqs):
            rid = seq.request_id
            req = self.requests.get(rid)
            if (req is None or req.status != RequestStatus.RUNNING
                    or self._generation[rid] != seq.generation):
                continue  # aborted, finished or preempted since it was scheduled
            if seq.samples:  # else a mid-prompt chunk: its sampled token is meaningless
                self._inflight[rid] -= 1
                req.output_token_ids.append(int(sampled_token_ids[i]))
                if req.first_token_time is None:
                    req.first_token_time = time.monotonic()
            known = min(req.num_computed_tokens, req.num_tokens)  # KV written or being written
            if (self.allocator.enable_prefix_caching
                    and known // self.page_size > len(self._hashes[rid])):
                self.allocator.commit(req.page_ids, req.all_token_ids[:known], self._hashes[rid])
            if not seq.samples:
                continue
            tok = req.output_token_ids[-1]
            lp: tuple[TokenLogprobs, ...] = ()
            if req.sampling.logprobs is not None and logprobs is not None:
                k = req.sampling.logprobs
                top: tuple[tuple[int, float], ...] = ()
                if top_logprob_ids is not None and top_logprobs is not None and k > 0:
                    top = tuple((int(t), float(v)) for t, v in
                                zip(top_logprob_ids[i][:k], top_logprobs[i][:k]))
                lp = (TokenLogprobs(tok, float(logprobs[i]), top),)
            status = self._stop_status(req, tok)
            if status is not None:
                self.finish(req.request_id, status)
            results.append(RequestOutput(
                req.request_id, (tok,), "", status is not None,
                status.value if status is not None else None, req.stop_reason, lp,
                num_prompt_tokens=req.num_prompt_tokens,
                num_output_tokens=len(req.output_token_ids),
                num_cached_tokens=req.num_cached_tokens))
        return results

    def _stop_status(self, req: Request, tok: int) -> RequestStatus | None:
        sp = req.sampling
        n_out = len(req.output_token_ids)
        if n_out > sp.min_tokens:
            if tok in sp.stop_token_ids:
                req.stop_reason = tok
                return RequestStatus.FINISHED_STOPPED
            if not sp.ignore_eos and tok in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if n_out >= sp.max_tokens or req.num_tokens >= self.cfg.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # ---- introspection ------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raises RuntimeError if pages and requests disagree (used by tests)."""
        self.allocator.check_invariants()
        owners: dict[int, int] = collections.Counter()
        for req in self.running:
            if len(set(req.page_ids)) != len(req.page_ids):
                raise RuntimeError(f"{req.request_id} holds a page twice")
            for p in req.page_ids:
                owners[p] += 1
        for req in self.waiting:
            if req.page_ids:
                raise RuntimeError(f"waiting {req.request_id} holds pages")
        for p, c in owners.items():
            if self.allocator.ref_count(p) != c:
                raise RuntimeError(f"page {p}: ref {self.allocator.ref_count(p)} but {c} owners")
        if self.allocator.num_used != len(owners):
            raise RuntimeError("used pages not all owned by running requests")

