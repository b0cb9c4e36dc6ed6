"""Data parallelism: D engine replicas, each on its own tp devices, behind the Engine's API.

``--data-parallel-size D`` with ``--tensor-parallel-size tp`` uses D x tp devices. The model is
loaded once (sharding/replicas.py: each replica's arrays are the loaded shards on its devices),
and every replica is a whole `Engine`: its own runner, KV pages, scheduler and prefix cache.
`DataParallelEngine` routes each new request to the least-loaded replica and steps all replicas
at once, one thread each (the device work and the waits on it release the GIL, so one replica's
host work overlaps the others' device steps). This is vLLM's data parallelism for dense models
(independent engines behind a load balancer), not a batch split inside one program.

What it does not do: route by prefix-cache contents (each replica caches its own prefixes), move
a request between replicas, or run replicas in separate processes. A step of the whole engine
waits for every replica's step, so a replica with a much longer step (a big prefill) holds the
others' next step back; the one step each replica keeps queued on its device hides most of it.

Failures: a replica whose step raises ends only its own requests (an error final each, as
`Engine.fail_all`, which also empties its prefix cache), the other replicas' outputs of that
step are returned, and for `retry_after_s` new requests go to the other replicas; then it gets
requests again (a transient failure does not cost a GPU for good; a broken one fails again and
rests again). Only when every busy replica's step fails does `step()` raise.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

from xlaserve.runtime.config import EngineConfig, ParallelConfig
from xlaserve.runtime.request import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


def build_runners(config: EngineConfig, *, num_replicas: int | None = None,
                  **runner_options: Any) -> tuple[list[Any], Any]:
    """Loads the model once and builds one ModelRunner per data-parallel replica (not warmed up).

    Args:
      config: the engine options; ``parallel`` gives tp and the replica count D.
      num_replicas: build only the first this many replicas (`xlaserve profile` builds one);
        default D. The devices of all D replicas are still checked.
      runner_options: passed to every ModelRunner.
    Returns:
      (runners, LoadedModel). One device (tp = D = 1): no mesh. Otherwise every runner has a
      ``1 x tp`` mesh of its own devices (row r of the ``D x tp`` mesh).
    """
    import jax

    from xlaserve.checkpoints.loader import load_model
    from xlaserve.runtime.model_runner import ModelRunner
    from xlaserve.sharding.decode_gemm import decode_gemm_hooks
    from xlaserve.sharding.mesh import validate_devices
    from xlaserve.sharding.replicas import replica_meshes, take_replica
    from xlaserve.sharding.specs import ShardingPlan

    par = config.parallel
    count = par.data_parallel_size if num_replicas is None else num_replicas
    if not 1 <= count <= par.data_parallel_size:
        raise ValueError(f"num_replicas={num_replicas}: must be in [1, {par.data_parallel_size}]")

    def runner(cfg: Any, params: Any, plan: ShardingPlan | None) -> ModelRunner:
        if plan is not None:
            plan = plan.with_all_reduce(par.all_reduce).with_decode_gemm(config.decode_gemm)
            kw: dict[str, Any] = dict(
                mesh=plan.mesh, param_shardings=plan.param_shardings,
                kv_sharding=plan.kv_sharding, attention_fn=plan.attention_fn,
                row_parallel_fn=plan.row_parallel_fn, project_fn=plan.project_fn)
        else:  # one device, no mesh
            kw = dict(zip(("row_parallel_fn", "project_fn"),
                          decode_gemm_hooks(None, cfg, config.decode_gemm)))
        return ModelRunner(cfg, params, config.cache, config.scheduler,
                           attention_impl=config.attention_impl,
                           compilation_cache_dir=config.compilation_cache_dir,
                           **kw, **runner_options)

    def load(shardings_fn: Any) -> Any:
        return load_model(config.model, load_format=config.load_format, dtype=config.dtype,
                          shardings_fn=shardings_fn, seed=config.seed)

    if par.world_size == 1:
        loaded = load(None)
        return [runner(loaded.config, loaded.params, None)], loaded
    validate_devices(par, len(jax.devices()))
    # Loaded once onto the rows that are built: split over `model`, replicated over `data`.
    load_par = ParallelConfig(tensor_parallel_size=par.tensor_parallel_size,
                              data_parallel_size=count, all_reduce=par.all_reduce)
    plans: dict[str, ShardingPlan] = {}

    def plan_fn(cfg: Any) -> Any:
        plans["all"] = ShardingPlan.create(cfg, load_par, attention_impl=config.attention_impl)
        return plans["all"].param_shardings

    loaded = load(plan_fn)
    full = plans["all"]
    if count == 1:
        return [runner(loaded.config, loaded.params, full)], loaded
    runners = []
    one_row = ParallelConfig(tensor_parallel_size=par.tensor_parallel_size,
                             all_reduce=par.all_reduce)
    for mesh in replica_meshes(full.mesh):
        plan = ShardingPlan.create(loaded.config, one_row, mesh=mesh,
                                   attention_impl=config.attention_impl)
        runners.append(runner(loaded.config, take_replica(loaded.params, plan.param_shardings),
                              plan))
    return runners, loaded  # loaded.params: the same device buffers the replicas use


def warm_up(runners: Sequence[Any], progress: Any = None) -> None:
    """Compiles every runner's buckets; several replicas at once (XLA's compiles release the
    GIL). `progress` as ModelRunner.warmup's."""
    if len(runners) == 1:
        runners[0].warmup(progress=progress)
        return
    with concurrent.futures.ThreadPoolExecutor(len(runners)) as pool:
        list(pool.map(lambda r: r.warmup(progress=progress), runners))


class DataParallelEngine:
    """D Engines (one per replica) behind Engine's add_request / step / abort / has_work / stats.

    Args:
      replicas: at least two Engines with the same model, config and tokenizer, each on its own
        devices. Request ids are unique across all of them.
      retry_after_s: how long a replica whose step failed gets no new requests (while another
        replica can take them).
    """

    def __init__(self, replicas: Sequence[Any], *, retry_after_s: float = 10.0) -> None:
        if len(replicas) < 2:
            raise ValueError(f"replicas: {len(replicas)} given, need at least 2 (use the Engine "
                             f"itself for one)")
        self.replicas = list(replicas)
        first = self.replicas[0]
        self.config, self.tokenizer = first.config, first.tokenizer
        self.model_config, self.eos_token_ids = first.model_config, first.eos_token_ids
        self.async_scheduling = first.async_scheduling
        self._counter = 0  # seeds of unseeded requests, as one Engine would give them
        self.retry_after_s = retry_after_s
        self._failed_at: list[float | None] = [None] * len(self.replicas)  # last failed step
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=len(self.replicas), thread_name_prefix="xlaserve-replica")

    @property
    def runner(self) -> Any:
        """Replica 0's runner (every replica compiles the same buckets)."""
        return self.replicas[0].runner

    def resting(self, i: int) -> bool:
        """Whether replica i's step failed less than `retry_after_s` ago."""
        failed = self._failed_at[i]
        return failed is not None and time.monotonic() - failed < self.retry_after_s

    def _pick(self) -> int:
        """The replica for a new request: not resting first, then fewest sequences, then fewest
        used pages, then the lowest index."""
        def load(i: int) -> tuple[bool, int, int]:
            s = self.replicas[i].stats()
            return (self.resting(i), s.num_waiting + s.num_running, s.num_pages_used)
        return min(range(len(self.replicas)), key=load)

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling: SamplingParams) -> None:
        """Queues a request on one replica. Raises ValueError naming the field (as Engine's)."""
        ids = [request_id] + ([f"{request_id}#{i}" for i in range(sampling.n)]
                              if sampling.n > 1 else [])
        for rid in ids:
            if any(r.has_request(rid) for r in self.replicas):
                raise ValueError(f"request_id={rid!r}: already in use")
        if sampling.seed is None:  # the seed one Engine would derive, whichever replica runs it
            seed = (self.config.seed * 1_000_003 + self._counter) & 0xFFFFFFFF
            sampling = dataclasses.replace(sampling, seed=seed)
        self.replicas[self._pick()].add_request(request_id, prompt_token_ids, sampling)
        self._counter += sampling.n

    def abort(self, request_id: str) -> None:
        """Aborts the request wherever it runs (the others ignore an unknown id)."""
        for r in self.replicas:
            r.abort(request_id)

    def has_work(self) -> bool:
        return any(r.has_work() for r in self.replicas)

    def step(self) -> list[RequestOutput]:
        """One step of every replica with work, concurrently; their outputs in replica order."""
        busy = [i for i, r in enumerate(self.replicas) if r.has_work()]
        futures = {i: self._pool.submit(self.replicas[i].step) for i in busy}
        try:
            concurrent.futures.wait(futures.values())
        except BaseException:  # e.g. KeyboardInterrupt: the caller may abort next, and an
            concurrent.futures.wait(futures.values())  # Engine is not thread-safe: finish first
            raise
        outs: list[RequestOutput] = []
        errors: list[BaseException] = []
        for i in busy:
            error = futures[i].exception()
            if error is None:
                outs.extend(futures[i].result())
                self._failed_at[i] = None
                continue
            log.error("replica %d: step failed; ending its requests", i, exc_info=error)
            errors.append(error)
            self._failed_at[i] = time.monotonic()
            outs.extend(self.replicas[i].fail_all(f"engine step failed (replica {i}): "
                                                  f"{error!r}"))
        if busy and len(errors) == len(busy):
            raise errors[0]
        return outs

    def stats(self) -> Any:
        """The replicas' stats summed (last_step_time_s and num_steps: their maximum)."""
        all_stats = [r.stats() for r in self.replicas]
        first = all_stats[0]
        summed = {f.name: sum(getattr(s, f.name) for s in all_stats)
                  for f in dataclasses.fields(first)}
        summed["last_step_time_s"] = max(s.last_step_time_s for s in all_stats)
        summed["num_steps"] = max(s.num_steps for s in all_stats)
        return dataclasses.replace(first, **summed)

    def replica_stats(self) -> list[Any]:
        """Each replica's own EngineStats, in replica order."""
        return [r.stats() for r in self.replicas]
