"""Decode-sized projections through the Pallas skinny GEMM: the q/k/v and gate/up hook and the
plan's hooks.

`DecodeProjection` is the model's `layers.ProjectFn` / `llama.RopeWriteFn` for q/k/v (one
launch for the three products, then `rope_write_kv` for rope and the K/V write) and its
`layers.SwiGLUFn` for gate/up (one launch with SwiGLU's activation as the epilogue);
`decode_gemm_hooks` gives the plan its (row_parallel_fn, project_fn) for a decode GEMM mode,
o_proj / down_proj going through `specs.ShardedRowParallel.gemm_mode`. Split from specs.py
(which keeps the shardings, the attention and row-parallel hooks and the plan).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from xlaserve.pallas_kernels import ops
from xlaserve.pallas_kernels.rope_write_kv import rope_write_kv
from xlaserve.pallas_kernels.skinny_gemm import skinny_gemm, skinny_gemm_swiglu
from xlaserve.runtime.config import ModelConfig
from xlaserve.runtime.models.layers import Deferred
from xlaserve.sharding.mesh import MODEL_AXIS
from xlaserve.sharding.rules import KV_CACHE_AXES, kv_heads_sharded, logical_to_spec
from xlaserve.sharding.specs import ShardedRowParallel, _shard_map, local_shape, mesh_rules


@dataclasses.dataclass(frozen=True)
class DecodeProjection:
    """A `layers.ProjectFn`: q_proj, k_proj and v_proj of a decode-sized step as one launch of
    the Pallas skinny GEMM on each device's slices of the three kernels (under shard_map on a
    mesh; the column-parallel kernels need no collective), where `ops.skinny_gemm_config` picks
    it for the local shapes (mode "auto": the measured table). Otherwise each product is the
    plain contraction (the partitioner splits it as before).

    As a `llama.RopeWriteFn` (`rope_write`, on by default) it also finishes q/k/v in one more
    launch: the kernel's float32 split-K partials go straight to `rope_write_kv`, which sums
    them, applies rope to q and k and stores k and v into the pages (four kernels fewer per
    layer). Called as a plain ProjectFn, the partials are summed and rounded here and XLA fuses
    that sum into the consumers (RoPE, the K/V write). `mesh` None: one device, no shard_map.
    Frozen and hashable: a static part of the jitted step.
    """

    mesh: Mesh | None
    model_cfg: ModelConfig
    mode: str = "auto"
    fuse_rope_write: bool = True

    def _plan(self, products: Sequence[Deferred], epilogue: str = "") -> tuple[Any, ...]:
        """(rules, kernel specs, local widths N_i, K, the GEMM's tiles or None) of q/k/v, or of
        gate/up with `epilogue` "swiglu"."""
        x = products[0].x
        n_in = len(products[0].in_axes)
        if any(p.x is not x or len(p.in_axes) != n_in for p in products):
            raise ValueError("DecodeProjection: the products must share one input x")
        rules = None if self.mesh is None else mesh_rules(self.model_cfg, self.mesh)
        specs = [PartitionSpec() if rules is None
                 else logical_to_spec((*p.in_axes, *p.out_axes), rules) for p in products]
        locals_ = [p.kernel.shape if self.mesh is None
                   else local_shape(p.kernel.shape, spec, self.mesh)
                   for p, spec in zip(products, specs)]
        k = int(np.prod(x.shape[x.ndim - n_in:]))
        ns = [int(np.prod(shape[n_in:])) for shape in locals_]
        gemm = ops.skinny_gemm_config(x.shape[0], k, ns, x.dtype, self.mode, epilogue=epilogue)
        return rules, specs, ns, k, gemm

    def _partials(self, x: jax.Array, kernels: Sequence[jax.Array], k: int, gemm: Any,
                  ) -> jax.Array:  # f32 [S, T, sum N]: this device's q/k/v partials
        return skinny_gemm(x.reshape(x.shape[0], k), tuple(w.reshape(k, -1) for w in kernels),
                           config=gemm, interpret=self.mode == "pallas_interpret")

    def __call__(self, products: Sequence[Deferred], dtype: Any) -> tuple[jax.Array, ...]:
        rules, specs, ns, k, gemm = self._plan(products)
        if gemm is None:
            return tuple(p.compute(dtype) for p in products)
        n_in = len(products[0].in_axes)

        def body(x, *kernels):
            t = x.shape[0]
            y = self._partials(x, kernels, k, gemm).sum(axis=0).astype(dtype)  # [T, sum N]
            outs, start = [], 0
            for w, n in zip(kernels, ns):
                outs.append(y[:, start:start + n].reshape(t, *w.shape[n_in:]))
                start += n
            return tuple(outs)

        kernels = [p.kernel for p in products]
        if self.mesh is None:
            return body(products[0].x, *kernels)
        x_spec = logical_to_spec(("tokens", *products[0].in_axes), rules)
        out_specs = tuple(logical_to_spec(("tokens", *p.out_axes), rules) for p in products)
        fn = _shard_map(body, self.mesh, in_specs=(x_spec, *specs), out_specs=out_specs)
        return fn(products[0].x, *kernels)

    def rope_write(self, products: Sequence[Deferred], dtype: Any, cos: jax.Array,
                   sin: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                   slot_mapping: jax.Array, rows: jax.Array,
                   ) -> tuple[jax.Array, jax.Array, jax.Array] | None:
        """(q with rope [T, N, H], k_pages, v_pages) through the skinny GEMM and
        `rope_write_kv`, or None where the GEMM is XLA's, `fuse_rope_write` is off or the KV
        heads are not split over the mesh (tp > K: each device then picks its head out of
        replicated K/V, which the attention hook does)."""
        if not self.fuse_rope_write or len(products) != 3:
            return None
        tp = 1 if self.mesh is None else self.mesh.shape[MODEL_AXIS]
        rules, specs, ns, k, gemm = self._plan(products)
        if gemm is None:
            return None
        shape = f"{products[0].x.shape[0]} tokens, q/k/v widths {ns} per device"
        if not kv_heads_sharded(self.model_cfg, tp):
            ops.log_rope_write_choice(shape, f"XLA's rope + write_kv_pages (tp={tp} > KV heads "
                                             f"{self.model_cfg.num_kv_heads}: replicated K/V)")
            return None
        n_q = self.model_cfg.num_heads // tp
        ops.log_rope_write_choice(shape, "rope_write_kv kernel")
        interpret = self.mode == "pallas_interpret"

        def body(x, wq, wk, wv, cos, sin, slot_mapping, k_pages, v_pages, rows):
            parts = self._partials(x, (wq, wk, wv), k, gemm)
            return rope_write_kv(parts, cos, sin, slot_mapping, k_pages, v_pages, rows,
                                 num_q_heads=n_q, dtype=jnp.dtype(dtype), interpret=interpret)

        wq, wk, wv = (p.kernel for p in products)  # three products (checked above)
        args = (products[0].x, wq, wk, wv, cos, sin, slot_mapping, k_pages, v_pages, rows)
        if self.mesh is None:
            return body(*args)
        rep = PartitionSpec()
        pages_spec = logical_to_spec(KV_CACHE_AXES, rules)
        fn = _shard_map(
            body, self.mesh,
            in_specs=(logical_to_spec(("tokens", *products[0].in_axes), rules), *specs,
                      rep, rep, rep, pages_spec, pages_spec, rep),
            out_specs=(logical_to_spec(("tokens", *products[0].out_axes), rules), pages_spec,
                       pages_spec))
        return fn(*args)


    def swiglu(self, gate: Deferred, up: Deferred, dtype: Any) -> jax.Array | None:
        """A `layers.SwiGLUFn`: silu(x . gate) * (x . up) [T, I] through `skinny_gemm_swiglu`
        on each device's columns of the two kernels (column-parallel: no collective), where
        `ops.skinny_gemm_config(..., epilogue="swiglu")` picks it for the local shape; None
        otherwise (the MLP then runs XLA's GEMM and the activation)."""
        if gate.kernel.shape != up.kernel.shape or len(gate.in_axes) != 1:
            raise ValueError("DecodeProjection.swiglu: gate and up must be [D] -> [I] "
                             "projections of one x")
        rules, specs, _, _, cfg = self._plan((gate, up), epilogue="swiglu")
        if cfg is None:
            return None

        def body(x, wg, wu):
            return (skinny_gemm_swiglu(x, wg, wu, config=cfg,
                                       interpret=self.mode == "pallas_interpret").astype(dtype),)

        if self.mesh is None:
            return body(gate.x, gate.kernel, up.kernel)[0]
        fn = _shard_map(body, self.mesh,
                        in_specs=(logical_to_spec(("tokens", *gate.in_axes), rules), *specs),
                        out_specs=(logical_to_spec(("tokens", *gate.out_axes), rules),))
        return fn(gate.x, gate.kernel, up.kernel)[0]


def decode_gemm_hooks(mesh: Mesh | None, model_cfg: ModelConfig, mode: str,
                      row: ShardedRowParallel | None = None,
                      ) -> tuple[ShardedRowParallel | None, DecodeProjection | None]:
    """(row_parallel_fn, project_fn) with the decode GEMM `mode` (ops.skinny_gemm_config):
    `row` (the all-reduce's hook, if any) takes the mode; without one, on a single device (no
    mesh, or tp 1), o_proj / down_proj get a hook without collective. "xla" (or "auto" off
    GPU) adds nothing, and "auto" adds a hook only where the measured table has the model's
    local shape (so a model the table does not cover keeps exactly XLA's program)."""
    if mode not in ops.SKINNY_GEMM_MODES:
        raise ValueError(f"decode_gemm={mode!r}: must be one of {ops.SKINNY_GEMM_MODES}")
    if row is not None:
        row = dataclasses.replace(row, gemm_mode=mode)
    if mode == "xla":
        return row, None
    single = mesh is None or mesh.shape[MODEL_AXIS] == 1
    # "auto" off GPU covers nothing (ops.skinny_gemm_config picks XLA's GEMM there)
    qkv, o_down = (True, True) if mode != "auto" else _table_covers(model_cfg, mesh)
    if row is None and single and o_down:
        row = ShardedRowParallel(mesh, model_cfg, None, gemm_mode=mode)
    return row, DecodeProjection(mesh, model_cfg, mode) if qkv else None


def _table_covers(model_cfg: ModelConfig, mesh: Mesh | None) -> tuple[bool, bool]:
    """(q/k/v or gate/up, o_proj or down_proj): does the measured table hold this model's local
    shape on this mesh, for a decode step of its largest row count? (DecodeProjection serves
    q/k/v and gate/up, each where its own shape is covered.)"""
    tp = 1 if mesh is None else mesh.shape[MODEL_AXIS]
    c, h = model_cfg, model_cfg.head_dim
    kv = c.num_kv_heads * h // (tp if kv_heads_sharded(c, tp) else 1)
    rows = ops.skinny_gemm_table()[0]

    def covered(k: int, ns: tuple[int, ...], epilogue: str = "") -> bool:
        return ops.skinny_gemm_config(rows, k, ns, c.dtype, "auto", epilogue=epilogue) is not None

    mlp = c.intermediate_size // tp
    qkv = (covered(c.hidden_size, (c.num_heads * h // tp, kv, kv))
           or covered(c.hidden_size, (mlp, mlp), "swiglu"))  # the same hook does gate/up
    o_down = (covered(c.num_heads * h // tp, (c.hidden_size,))
              or covered(c.intermediate_size // tp, (c.hidden_size,)))
    return qkv, o_down
