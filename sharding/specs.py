"""Shardings of params, KV cache and step inputs, the shard_map'd attention, and one plan.

Everything here is derived from the rules table (rules.py) and the model's logical axes
(`llama.param_logical_axes`); nothing else names a mesh axis for a model array.

Entry point for the engine (what runtime/engine.py does; the ModelConfig is only known once
the loader has read config.json, so the plan is made inside ``shardings_fn``)::

    def shardings_fn(cfg):                      # called by load_model with the model's config
        plan = ShardingPlan.create(cfg, parallel, attention_impl=impl)   # mesh + validation
        return plan.param_shardings             # each device then reads only its slice
    loaded = load_model(model, ..., shardings_fn=shardings_fn)
    ModelRunner(loaded.config, loaded.params, ..., mesh=plan.mesh,
                param_shardings=plan.param_shardings, kv_sharding=plan.kv_sharding,
                attention_fn=plan.attention_fn)       # its kv_cache_heads sizes the cache

A plan on a ``data`` > 1 mesh replicates everything over ``data``, step inputs included (each row
would run the same step on the same batch): the engine uses it only to load the model once, then
builds one ``1 x tp`` plan per row (runtime/data_parallel.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xlaserve.pallas_kernels import ops
from xlaserve.pallas_kernels.skinny_gemm import skinny_gemm
from xlaserve.runtime.batch import StepInputs
from xlaserve.runtime.config import ModelConfig, ParallelConfig
from xlaserve.runtime.models import llama
from xlaserve.runtime.models.layers import add_rms_norm, contract
from xlaserve.sharding import all_reduce as custom_all_reduce
from xlaserve.sharding.mesh import DATA_AXIS, MODEL_AXIS, make_mesh, validate_model
from xlaserve.sharding.rules import (
    KV_CACHE_AXES,
    Rules,
    kv_cache_heads,
    kv_heads_sharded,
    logical_to_spec,
    rules_for,
)

if TYPE_CHECKING:  # decode_gemm imports this module
    from xlaserve.sharding.decode_gemm import DecodeProjection

log = logging.getLogger(__name__)


def mesh_parallel(mesh: Mesh) -> ParallelConfig:
    """The ParallelConfig a ``("data", "model")`` mesh was built from."""
    if tuple(mesh.axis_names) != (DATA_AXIS, MODEL_AXIS):
        raise ValueError(f"mesh axis_names={tuple(mesh.axis_names)}: must be "
                         f"({DATA_AXIS!r}, {MODEL_AXIS!r}) (use sharding.mesh.make_mesh)")
    return ParallelConfig(tensor_parallel_size=mesh.shape[MODEL_AXIS],
                          data_parallel_size=mesh.shape[DATA_AXIS])


def mesh_rules(model_cfg: ModelConfig, mesh: Mesh) -> Rules:
    """The rules table for this model on this mesh, after checking the model splits evenly."""
    parallel = mesh_parallel(mesh)
    validate_model(parallel, model_cfg)
    return rules_for(model_cfg, parallel.tensor_parallel_size)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple)


def param_specs(model_cfg: ModelConfig, rules: Rules) -> llama.Params:
    """PartitionSpec of every parameter (same tree as the params)."""
    axes = llama.param_logical_axes(model_cfg)
    return jax.tree.map(lambda a: logical_to_spec(a, rules), axes, is_leaf=_is_axes)


def param_shardings(model_cfg: ModelConfig, mesh: Mesh) -> llama.Params:
    """NamedSharding of every parameter (same tree as the params).

    Raises:
      ValueError: the model does not split over the mesh's ``model`` axis (names the field).
    """
    specs = param_specs(model_cfg, mesh_rules(model_cfg, mesh))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def make_shardings_fn(mesh: Mesh) -> Callable[[ModelConfig], llama.Params]:
    """``shardings_fn`` for checkpoints.loader.load_model: cfg -> param shardings on `mesh`."""
    def shardings_fn(model_cfg: ModelConfig) -> llama.Params:
        return param_shardings(model_cfg, mesh)
    return shardings_fn


def kv_cache_sharding(model_cfg: ModelConfig, mesh: Mesh) -> NamedSharding:
    """Sharding of one layer's k_pages or v_pages [C, P, L, H]: stored heads over ``model``.

    C is `rules.kv_cache_heads`: K when tp divides K, else tp (one copy of the KV head each
    device reads, on that device).
    """
    return NamedSharding(mesh, logical_to_spec(KV_CACHE_AXES, mesh_rules(model_cfg, mesh)))


def step_input_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of every StepInputs array (and of sampled outputs): replicated on all devices.

    Use it as a pytree prefix for a whole StepInputs in ``jit(in_shardings=...)``. Replicated
    over ``data`` too: data parallelism does not split the batch in this version.
    """
    return NamedSharding(mesh, PartitionSpec())


def _shard_map(f: Callable[..., Any], mesh: Mesh, in_specs: tuple[Any, ...],
               out_specs: tuple[Any, ...]) -> Callable[..., Any]:
    """jax.shard_map where it exists, else jax.experimental.shard_map (older jax).

    Replication checking is off: the body calls kernels (Pallas custom calls) that carry no
    replication types. The specs below are exact, so the check would add nothing.
    """
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)
    from jax.experimental.shard_map import shard_map  # older jax: check_rep, not check_vma

    return shard_map(f, mesh, in_specs, out_specs, check_rep=False)


@dataclasses.dataclass(frozen=True)
class ShardedAttention:
    """An `llama.AttentionFn` that runs the KV write and the attention op under shard_map.

    Each device writes and attends over its own KV heads and its own q heads, so the kernel
    never sees another device's heads and no collective runs inside attention.

    When tp does not divide the KV head count (tp > K, tp a multiple of K), the K/V projections
    are replicated and the cache stores tp heads [tp, P, L, H], split over ``model``: device d
    keeps only KV head d // (tp // K), the one its q heads read. It picks that head out of the
    new K/V rows, writes it to its pages and attends over them, like the split case.

    Frozen and hashable, so it can be a static argument of jit; equal plans give equal wrappers.
    """

    mesh: Mesh
    model_cfg: ModelConfig
    impl: str = "auto"

    @property
    def kv_cache_heads(self) -> int:
        """C, the head count of the KV cache arrays this attention reads and writes."""
        return kv_cache_heads(self.model_cfg, self.mesh.shape[MODEL_AXIS])

    def __call__(self, q: jax.Array, k_new: jax.Array | None, v_new: jax.Array | None,
                 k_pages: jax.Array, v_pages: jax.Array, inputs: StepInputs, *, sm_scale: float,
                 sliding_window: int | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        rules = mesh_rules(self.model_cfg, self.mesh)
        tp = self.mesh.shape[MODEL_AXIS]
        split_kv = kv_heads_sharded(self.model_cfg, tp)
        group = 1 if split_kv else tp // self.model_cfg.num_kv_heads  # devices per KV head
        want = self.kv_cache_heads
        if k_pages.shape[0] != want or v_pages.shape[0] != want:
            raise ValueError(
                f"KV cache head count {k_pages.shape[0]}/{v_pages.shape[0]}: this plan (tp={tp}, "
                f"num_kv_heads={self.model_cfg.num_kv_heads}) stores {want} heads; make the "
                f"cache with ShardingPlan.init_kv_cache")
        q_spec = logical_to_spec(("tokens", "q_heads", "head_dim"), rules)
        kv_new_spec = logical_to_spec(("tokens", "kv_heads", "head_dim"), rules)
        pages_spec = logical_to_spec(KV_CACHE_AXES, rules)
        rep = PartitionSpec()
        impl = self.impl

        def attend(q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs):
            o = ops.ragged_paged_attention(
                q, k_pages, v_pages, kv_lens, page_table, cu_q_lens, num_seqs,
                sm_scale=sm_scale, sliding_window=sliding_window, impl=impl)
            return o, k_pages, v_pages

        def body(q, k_new, v_new, k_pages, v_pages, slot_mapping, *meta):
            # Local shapes: q [T, N/tp, H]; pages [C/tp, P, L, H]; k_new, v_new [T, K/tp, H]
            # (split) or [T, K, H] (replicated projections; C/tp = 1).
            if not split_kv:
                head = jax.lax.axis_index(MODEL_AXIS) // group
                k_new = jax.lax.dynamic_slice_in_dim(k_new, head, 1, axis=1)  # [T, 1, H]
                v_new = jax.lax.dynamic_slice_in_dim(v_new, head, 1, axis=1)
            k_pages, v_pages = ops.write_kv_pages(k_pages, v_pages, k_new, v_new, slot_mapping)
            return attend(q, k_pages, v_pages, *meta)

        meta = (inputs.kv_lens, inputs.page_table, inputs.cu_q_lens, inputs.num_seqs)
        if k_new is None:  # already written (llama.RopeWriteFn)
            fn = _shard_map(attend, self.mesh,
                            in_specs=(q_spec, pages_spec, pages_spec, rep, rep, rep, rep),
                            out_specs=(q_spec, pages_spec, pages_spec))
            return fn(q, k_pages, v_pages, *meta)
        fn = _shard_map(
            body, self.mesh,
            in_specs=(q_spec, kv_new_spec, kv_new_spec, pages_spec, pages_spec,
                      rep, rep, rep, rep, rep),
            out_specs=(q_spec, pages_spec, pages_spec))
        return fn(q, k_new, v_new, k_pages, v_pages, inputs.slot_mapping, *meta)


def shard_attention(mesh: Mesh, model_cfg: ModelConfig, *, impl: str = "auto",
                    ) -> ShardedAttention:
    """The attention step of `llama.forward` (``attention_fn=``) split over the mesh's heads.

    Raises:
      ValueError: the model's heads do not split over the mesh (names the field).
    """
    mesh_rules(model_cfg, mesh)  # validate now, not at trace time
    return ShardedAttention(mesh, model_cfg, impl)


@dataclasses.dataclass(frozen=True)
class ShardedRowParallel:
    """A `llama.RowParallelFn`: residual + (each device's slice of the product, all-reduced),
    then the RMSNorm after it, under one shard_map.

    o_proj and down_proj contract an axis split over ``model``; instead of letting the
    partitioner insert XLA's collective, the product runs under shard_map and its partial sums
    are reduced by `all_reduce` (sharding/all_reduce.py): one kernel that also adds the
    residual and applies the norm where a row fits it (`fits_add_rms_norm`: up to 128 tokens
    of up to 8 KiB, e.g. hidden 4096 in bf16), else the plain all-reduce kernel and the add and
    norm after it. With `all_reduce` None the reduction is jax.lax.psum (the reference, and the
    CPU path of the tests). A product over the kernel's message limit (prefill-sized steps)
    keeps the partitioner's collective.

    `mesh` None (one device, no mesh; `all_reduce` must be None): no shard_map and no reduction;
    the decode GEMM is then the only reason for the hook.

    Frozen and hashable: a static part of the jitted step.
    """

    mesh: Mesh | None
    model_cfg: ModelConfig
    all_reduce: custom_all_reduce.AllReduce | None = None
    # > 1: the fused kernel's product runs as an explicit split-K GEMM into float32 partials
    # [S, T, D] that the kernel sums (no separate reduce kernel before it); S is the largest
    # divisor of the local contraction size up to this. 0 or 1: one product in the model dtype
    # (XLA then splits the GEMM itself and reduces its partials in a kernel of its own). 4
    # measured on 2 x H200, 8B decode B=1 at tp 2: 3.201 ms against 3.314 with 1 and 3.232
    # with 8 (bench/results/session11_h200x2/call2_split_k).
    split_k: int = 4
    # ops.skinny_gemm_config's mode for the product of decode-sized steps: "auto" runs the
    # Pallas skinny GEMM (its split-K partials go to the fused kernel as they are) for shapes of
    # its measured table, XLA's GEMM otherwise.
    gemm_mode: str = "auto"
    # The fused kernel leaves the padding rows after the step's real token count alone (zeros,
    # no exchange): a batch-1 decode step pads 1 token to 16 rows. False exchanges all rows
    # (the A/B of bench/tp_scaling.py --no-skip-padding).
    skip_padding: bool = True

    def uses_kernel(self, out_shape: tuple[int, ...], dtype: Any) -> bool:
        """True when a product of this output shape runs through the kernel."""
        return self.all_reduce is not None and custom_all_reduce.fits(out_shape, dtype)

    def uses_fused_kernel(self, out_shape: tuple[int, ...], dtype: Any) -> bool:
        """True when the kernel also adds the residual and applies the norm (one launch)."""
        return (self.uses_kernel(out_shape, dtype)
                and custom_all_reduce.fits_add_rms_norm(out_shape, dtype))

    def __call__(self, residual: jax.Array, x: jax.Array, kernel: jax.Array,
                 in_axes: tuple[str | None, ...], out_axes: tuple[str | None, ...],
                 scale: jax.Array, eps: float, rows: jax.Array | None = None,
                 ) -> tuple[jax.Array, jax.Array]:
        n_in = len(in_axes)
        out_shape = x.shape[:x.ndim - n_in] + kernel.shape[n_in:]  # [T, D]
        dt = residual.dtype  # the model dtype (the residual stream's)
        if self.all_reduce is not None and not self.uses_kernel(out_shape, dt):
            # the partitioner all-reduces the product
            return add_rms_norm(residual, contract(x, kernel, n_in, dt), scale, eps)
        if self.mesh is None and self.all_reduce is not None:
            raise ValueError("ShardedRowParallel: an all-reduce kernel needs a mesh")
        # the kernel that also adds the residual and norms, where it takes this product
        fused = self.all_reduce if self.uses_fused_kernel(out_shape, dt) else None
        # the shard_map's mesh and the specs of x [T, *in] and kernel (in split); None: no mesh
        sharded: tuple[Mesh, PartitionSpec, PartitionSpec] | None
        if self.mesh is None:
            local = kernel.shape
            reduce: Callable[[jax.Array], jax.Array] = lambda a: a  # noqa: E731
            sharded = None
        else:
            rules = mesh_rules(self.model_cfg, self.mesh)
            kernel_spec = logical_to_spec((*in_axes, *out_axes), rules)
            local = local_shape(kernel.shape, kernel_spec, self.mesh)
            reduce = (self.all_reduce if self.all_reduce is not None
                      else functools.partial(jax.lax.psum, axis_name=MODEL_AXIS))
            sharded = (self.mesh, logical_to_spec(("tokens", *in_axes), rules), kernel_spec)
        k_local, d = int(np.prod(local[:n_in])), int(np.prod(local[n_in:]))
        gemm = ops.skinny_gemm_config(out_shape[0], k_local, (d,), dt, self.gemm_mode)
        interpret = self.gemm_mode == "pallas_interpret"

        def partials(x, kernel):  # f32 [S, T, *out] (the Pallas skinny GEMM)
            parts = skinny_gemm(x.reshape(x.shape[0], k_local), (kernel.reshape(k_local, d),),
                                config=gemm, interpret=interpret)
            return parts.reshape(parts.shape[:2] + kernel.shape[n_in:])

        if rows is None or not self.skip_padding:
            rows = jnp.full((1,), out_shape[0], jnp.int32)

        def body(residual, x, kernel, scale, rows):
            if fused is not None:  # this device's partial sum, f32 split-K [S, T, D] or [T, D]
                if gemm is not None:
                    part = partials(x, kernel)
                elif self.split_k > 1:
                    part = split_k_contract(x, kernel, n_in, self.split_k)
                else:
                    part = contract(x, kernel, n_in, dt)
                # the padding rows after `rows` are neither exchanged nor normed
                return fused.add_rms_norm(part, residual, scale, eps, rows)
            product = (partials(x, kernel).sum(axis=0).astype(dt) if gemm is not None
                       else contract(x, kernel, n_in, dt))
            return add_rms_norm(residual, reduce(product), scale, eps)

        if sharded is None:
            return body(residual, x, kernel, scale, rows)
        mesh, x_spec, kernel_spec = sharded
        rep = PartitionSpec()
        fn = _shard_map(body, mesh, in_specs=(rep, x_spec, kernel_spec, rep, rep),
                        out_specs=(rep, rep))
        return fn(residual, x, kernel, scale, rows)


def local_shape(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> tuple[int, ...]:
    """The shape of one device's block of an array of `shape` laid out as `spec` on `mesh`."""
    out = list(shape)
    for i, axes in enumerate(spec):
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None:
                out[i] //= mesh.shape[axis]
    return tuple(out)


def split_k_contract(x: jax.Array, kernel: jax.Array, n_in: int, splits: int) -> jax.Array:
    """x [T, *in] . kernel [*in, D] as float32 partials [S, T, D] over S equal slices of the
    contraction (S the largest divisor of its size up to `splits`); their sum is the product."""
    t, k = x.shape[0], int(np.prod(x.shape[1:]))
    d = int(np.prod(kernel.shape[n_in:]))
    s = max(c for c in range(1, splits + 1) if k % c == 0)
    parts = jnp.einsum("tsk,skn->stn", x.reshape(t, s, k // s), kernel.reshape(s, k // s, d),
                       preferred_element_type=jnp.float32)
    return parts.reshape(s, t, *kernel.shape[n_in:])


def choose_row_parallel(mesh: Mesh, model_cfg: ModelConfig,
                        mode: str) -> ShardedRowParallel | None:
    """The row-parallel projections' all-reduce for `mode` (ParallelConfig.all_reduce).

    None means the partitioner's collective (XLA's) everywhere: tp = 1, mode "xla", or mode
    "auto" where the kernel cannot run (the reason is logged).

    Raises:
      ValueError: mode "custom" where the kernel cannot run (names the reason).
    """
    if mesh.shape[MODEL_AXIS] == 1 or mode == "xla":
        return None
    if mode == "psum":
        return ShardedRowParallel(mesh, model_cfg, None)
    try:  # create() checks availability first and names the reason
        kernel = custom_all_reduce.AllReduce.create(mesh, MODEL_AXIS)
    except RuntimeError as e:
        why = str(e)
        if mode == "custom":
            raise ValueError(f"all_reduce='custom': xlaserve's all-reduce kernel cannot run "
                             f"here: {why}") from e
        on_gpu = all(d.platform == "gpu" for d in mesh.devices.flat)
        (log.warning if on_gpu else log.info)(
            "all_reduce=auto: XLA's collective for every all-reduce; xlaserve's kernel cannot "
            "run here: %s", why)
        return None
    log.info("all_reduce=%s: xlaserve's kernel for o_proj / down_proj messages up to %d KiB "
             "per device (decode-sized steps; fused with the residual add and RMSNorm for up to "
             "%d rows of up to %d bytes), XLA's collective above", mode,
             custom_all_reduce.MAX_MESSAGE_BYTES >> 10, custom_all_reduce.MAX_CTAS,
             custom_all_reduce.CHUNK_BYTES)
    return ShardedRowParallel(mesh, model_cfg, kernel)


def describe_all_reduce(mesh: Mesh | None, row_parallel_fn: ShardedRowParallel | None,
                        mode: str = "auto") -> str:
    """One line on what reduces o_proj / down_proj (for `xlaserve profile` and the logs).

    `mode` is the ParallelConfig.all_reduce the plan was made with."""
    if mesh is None or mesh.shape[MODEL_AXIS] == 1:
        return "none (tensor_parallel_size 1)"
    if row_parallel_fn is None:
        if mode == "xla":
            return "XLA's collective (all_reduce='xla')"
        why = custom_all_reduce.availability(mesh, MODEL_AXIS)
        return ("XLA's collective (xlaserve's kernel cannot run: "
                + (why or "its set-up failed, see the log") + ")")
    if row_parallel_fn.all_reduce is None:
        return "jax.lax.psum under shard_map (all_reduce='psum')"
    cfg = row_parallel_fn.model_cfg
    biased = [n for n, b in (("o_proj", cfg.o_proj_bias), ("down_proj", cfg.mlp_bias)) if b]
    hidden = cfg.hidden_size
    if len(biased) == 2:
        return ("XLA's collective (o_proj and down_proj carry biases; xlaserve's kernel takes "
                "bias-free projections only)")
    if custom_all_reduce.fits_add_rms_norm((1, hidden), cfg.dtype):
        fused = (f"fused with the residual add and RMSNorm for steps of up to "
                 f"{custom_all_reduce.MAX_CTAS} tokens, ")
        if row_parallel_fn.split_k > 1:
            fused += (f"summing the product's split-K partials itself (up to "
                      f"{row_parallel_fn.split_k}), ")
    else:
        fused = (f"then the residual add and RMSNorm (hidden {hidden} {cfg.dtype} does not fit "
                 f"the fused kernel: rows of at most {custom_all_reduce.CHUNK_BYTES} bytes, a "
                 f"multiple of 16), ")
    kernel = row_parallel_fn.all_reduce
    how = (f" ({kernel.describe()})" if isinstance(kernel, custom_all_reduce.AllReduce) else "")
    return (f"xlaserve's kernel{how} for messages up to "
            f"{custom_all_reduce.MAX_MESSAGE_BYTES >> 10} KiB per device (decode-sized steps), "
            + fused + "XLA's collective above"
            + (f"; {' and '.join(biased)} (with a bias) use XLA's collective" if biased else ""))


@dataclasses.dataclass(frozen=True, eq=False)
class ShardingPlan:
    """Everything the engine needs to run one model on one mesh.

    Attributes:
      mesh: the ``("data", "model")`` device mesh.
      model_cfg: the model it was validated against.
      rules: the logical -> mesh axis table in force (kv_heads may be replicated).
      param_shardings: NamedSharding per parameter (same tree as the params).
      kv_sharding: sharding of each per-layer k_pages / v_pages [C, P, L, H].
      input_sharding: sharding of StepInputs arrays and of sampled outputs (replicated).
      attention_fn: pass as ``llama.forward(..., attention_fn=plan.attention_fn)``.
      row_parallel_fn: pass as ``llama.forward(..., row_parallel_fn=...)``; None (XLA's
        collectives) unless set by `with_all_reduce` (or `with_decode_gemm` at tp=1).
      project_fn: pass as ``llama.forward(..., project_fn=...)``; set by `with_decode_gemm`.
    """

    mesh: Mesh
    model_cfg: ModelConfig
    rules: Rules
    param_shardings: llama.Params
    kv_sharding: NamedSharding
    input_sharding: NamedSharding
    attention_fn: ShardedAttention
    row_parallel_fn: ShardedRowParallel | None = None
    project_fn: DecodeProjection | None = None

    def with_decode_gemm(self, mode: str) -> ShardingPlan:
        """This plan with decode-sized q/k/v products, and o_proj / down_proj, through the
        Pallas skinny GEMM where `mode` picks it (`ops.skinny_gemm_config`: "auto" the measured
        table on GPU; "xla" XLA's GEMMs). Call after `with_all_reduce`. At tp=1 o_proj /
        down_proj get a row-parallel hook without collective (psum over one device)."""
        from xlaserve.sharding.decode_gemm import decode_gemm_hooks  # imports this module

        row, project = decode_gemm_hooks(self.mesh, self.model_cfg, mode, self.row_parallel_fn)
        return dataclasses.replace(self, row_parallel_fn=row, project_fn=project)

    def with_all_reduce(self, mode: str) -> ShardingPlan:
        """This plan with the row-parallel all-reduce `mode` picks (`choose_row_parallel`);
        "custom" / "auto" allocate the kernel's workspace on the mesh's devices."""
        return dataclasses.replace(
            self, row_parallel_fn=choose_row_parallel(self.mesh, self.model_cfg, mode))

    @classmethod
    def create(cls, model_cfg: ModelConfig, parallel: ParallelConfig, *, mesh: Mesh | None = None,
               # jax.Device is jaxlib's compiled class, which has no stub: pyright sees a variable
               devices: list[jax.Device] | None = None,  # pyright: ignore[reportInvalidTypeForm]
               attention_impl: str = "auto") -> ShardingPlan:
        """Validates `parallel` against the devices and the model and derives every sharding.

        Args:
          model_cfg: the model (from its config.json).
          parallel: tensor / data parallel sizes.
          mesh: an existing mesh (e.g. the one the params were loaded onto); must match
            `parallel`. Default: ``make_mesh(parallel, devices)``.
          devices: devices for a new mesh; default all visible.
          attention_impl: ops.ragged_paged_attention implementation run on each device.
        """
        if mesh is None:
            mesh = make_mesh(parallel, devices, model_cfg)
        elif mesh_parallel(mesh) != dataclasses.replace(parallel, all_reduce="auto"):
            raise ValueError(f"mesh shape {dict(mesh.shape)} does not match tensor_parallel_size="
                             f"{parallel.tensor_parallel_size}, data_parallel_size="
                             f"{parallel.data_parallel_size}")
        return cls(mesh=mesh, model_cfg=model_cfg, rules=mesh_rules(model_cfg, mesh),
                   param_shardings=param_shardings(model_cfg, mesh),
                   kv_sharding=kv_cache_sharding(model_cfg, mesh),
                   input_sharding=step_input_sharding(mesh),
                   attention_fn=shard_attention(mesh, model_cfg, impl=attention_impl))

    @property
    def kv_cache_heads(self) -> int:
        """C, the cache's stored heads: K, or tp when tp > K (one per device)."""
        return self.attention_fn.kv_cache_heads

    @property
    def shardings_fn(self) -> Callable[[ModelConfig], llama.Params]:
        """For checkpoints.loader.load_model(shardings_fn=...)."""
        return make_shardings_fn(self.mesh)

    def init_kv_cache(self, num_pages: int, page_size: int, *,
                      dtype: Any = None) -> llama.KVCache:
        """Zeroed page pools laid out for this plan ([C, P, L, H] per layer, on the mesh)."""
        return llama.init_kv_cache(self.model_cfg, num_pages, page_size, dtype=dtype,
                                   sharding=self.kv_sharding, num_heads=self.kv_cache_heads)

    def logical_kv_cache(self, cache: llama.KVCache) -> llama.KVCache:
        """The cache as one device would hold it ([K, P, L, H] per layer): when tp > K, the
        first of each KV head's tp // K stored copies (for checks and debugging)."""
        group = self.kv_cache_heads // self.model_cfg.num_kv_heads
        return jax.tree.map(lambda a: a[::group], cache)

    def kv_cache_shardings(self) -> tuple[tuple[NamedSharding, NamedSharding], ...]:
        """Sharding tree matching the whole KV cache (per layer (k_pages, v_pages))."""
        return tuple((self.kv_sharding, self.kv_sharding)
                     for _ in range(self.model_cfg.num_layers))
