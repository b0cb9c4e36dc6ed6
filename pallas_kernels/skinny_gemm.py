"""Skinny GEMM: a few token rows against one or more weight matrices, as split-K partials.

Computes, for x [M, K] and weights w_i [K, N_i] (i = 0..W-1, the same K), the float32 partial
products of S equal slices of the contraction::

    out[s, m, off_i + n] = sum over k in slice s of x[m, k] * w_i[k, n]

with ``off_i = N_0 + ... + N_{i-1}``: the outputs of all weights side by side, so the sum over s
is ``concatenate([x @ w_0, x @ w_1, ...], axis=1)`` accumulated in float32.

Why: in a decode step (M = the token bucket, 16 at batch 1) every projection is a matrix-vector
product bound by reading its weight once from HBM. XLA's autotuner times each GEMM alone on
weights that stay in L2, and for the half-width projections of tensor parallelism (the 8B
model's q/k/v at tp=2: [4096, 3072], 25 MB) its choice reached 2.3-2.5 TB/s against 3.9-4.2
for the large GEMMs (bench/results/session10_h200x2/call1_profile). This kernel streams each
weight tile exactly once with a pipelined K loop and enough programs to fill the GPU, and its
callers consume the partials directly: the fused all-reduce sums them (o_proj, down_proj under
tp), XLA fuses the sum into the consumer otherwise (q/k/v: RoPE, the KV write).

Layouts:
  x        [M, K]            token rows (model dtype); M is padded to a multiple of 16 inside
  weights  W x [K, N_i]      same dtype as x; several weights are read by one launch
  out      f32[S, M, sum N]  split-K partials; their sum over S is the product

Algorithm: grid (sum N / block_n, S). Program (j, s) owns output columns
``j * block_n : (j + 1) * block_n`` (all in one weight: every N_i is a multiple of block_n) and
contraction rows ``s * K / S : (s + 1) * K / S``, which it walks in ``block_k`` steps with one
[M, block_k] x [block_k, block_n] dot each (float32 accumulator; Triton pipelines the loads over
``num_stages``). Several weights: the program picks its weight with one branch per weight.

Constraints: N_i % block_n == 0 and K % (S * block_k) == 0 (checked); block_n, block_k powers of
two >= 16.

`skinny_gemm_swiglu` is the same product for SwiGLU's gate and up weights with the activation
as its epilogue: ``h = silu(x @ w_gate) * (x @ w_up)`` in x's dtype, each product rounded to
x's dtype first as the unfused model does. One split (S = 1): a program holds whole columns of
both products, so the activation needs no second kernel. Why: a decode step otherwise runs the
gate/up GEMM, then a separate activation kernel (1.8 us at the 8B shape, plus ~1.4 us of launch
gap); every GEMM launch costs ~2.9 us of fixed time whatever its tiles
(bench/results/session20_h200/README.md). Traced, cold, at the 8B shape: 28.83 us against
30.30 + 2.19 for XLA's gate/up GEMM and activation at tp=2, 54.36 against 54.56 + 2.29 at tp=1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from xlaserve.pallas_kernels import pdl
from xlaserve.pallas_kernels.ragged_paged_attention import compiler_params

ROW_ALIGN = 16  # Triton dots need 16 rows: x is zero-padded to a multiple of this


@dataclasses.dataclass(frozen=True)
class SkinnyGemmConfig:
    """Tiles of one skinny GEMM launch (measured: pallas_kernels/skinny_gemm_tuning.json)."""

    block_n: int = 64
    block_k: int = 128
    num_splits: int = 4
    num_warps: int = 4
    num_stages: int = 4

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"SkinnyGemmConfig.{name}={v}: must be a power of two >= 16")
        for name in ("num_splits", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"SkinnyGemmConfig.{name}={getattr(self, name)}: must be >= 1")

    def fits(self, k: int, ns: Sequence[int]) -> str | None:
        """None when these tiles divide the shape, else the reason they do not."""
        if k % (self.num_splits * self.block_k):
            return (f"K={k} is not a multiple of num_splits * block_k = "
                    f"{self.num_splits} * {self.block_k}")
        bad = [n for n in ns if n % self.block_n]
        if bad:
            return f"N={bad} not a multiple of block_n={self.block_n}"
        return None


def _skinny_gemm_kernel(x_ref,  # [M, K / S]: this split's slice of the token rows
                        *refs,  # W weights [K, N_i] (whole), then out [M, block_n]
                        block_n: int, block_k: int, steps: int, block_bounds: tuple[int, ...],
                        early_launch: bool):
    if early_launch:
        pdl.launch_dependents()
    *w_refs, o_ref = refs
    j, s = pl.program_id(0), pl.program_id(1)
    k_first = s * (steps * block_k)
    m = x_ref.shape[0]

    def product(w_ref, n_first):
        def body(t, acc):
            xs = x_ref[:, pl.ds(t * block_k, block_k)]
            ws = w_ref[pl.ds(k_first + t * block_k, block_k), pl.ds(n_first, block_n)]
            return acc + lax.dot_general(xs, ws, (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)
        o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros((m, block_n), jnp.float32))

    if len(w_refs) == 1:
        product(w_refs[0], j * block_n)
        return
    for i, w_ref in enumerate(w_refs):
        lo, hi = block_bounds[i], block_bounds[i + 1]

        @pl.when((j >= lo) & (j < hi))
        def _(w_ref=w_ref, lo=lo):
            product(w_ref, (j - lo) * block_n)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def skinny_gemm(x: jax.Array, weights: Sequence[jax.Array], *,
                config: SkinnyGemmConfig = SkinnyGemmConfig(),
                interpret: bool = False) -> jax.Array:
    """f32[S, M, sum N_i] split-K partials of x [M, K] times each of `weights` [K, N_i].

    Raises:
      ValueError: shapes or dtypes that do not match, or tiles that do not divide them.
    """
    weights = tuple(weights)
    if x.ndim != 2 or not weights:
        raise ValueError(f"skinny_gemm: x must be [M, K] with at least one weight; got x "
                         f"{x.shape} and {len(weights)} weights")
    m, k = x.shape
    for i, w in enumerate(weights):
        if w.ndim != 2 or w.shape[0] != k or w.dtype != x.dtype:
            raise ValueError(f"skinny_gemm: weights[{i}] {w.shape} {w.dtype} must be [K={k}, N] "
                             f"of x's dtype {x.dtype}")
    ns = [w.shape[1] for w in weights]
    why = config.fits(k, ns)
    if why:
        raise ValueError(f"skinny_gemm: x {x.shape}, weights N={ns}: {why}")
    s = config.num_splits
    k_split = k // s
    m_pad = -(-m // ROW_ALIGN) * ROW_ALIGN
    if m_pad != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    bounds = [0]
    for n in ns:
        bounds.append(bounds[-1] + n // config.block_n)
    kernel = functools.partial(_skinny_gemm_kernel, block_n=config.block_n,
                               block_k=config.block_k, steps=k_split // config.block_k,
                               block_bounds=tuple(bounds),
                               early_launch=pdl.enabled(interpret, "skinny_gemm"))
    out = pl.pallas_call(
        kernel,
        grid=(bounds[-1], s),
        in_specs=[pl.BlockSpec((m_pad, k_split), lambda j, s_: (0, s_))]  # x: split s_'s slice
        + [pl.BlockSpec(w.shape, lambda j, s_: (0, 0)) for w in weights],  # weights: whole
        out_specs=pl.BlockSpec((None, m_pad, config.block_n), lambda j, s_: (s_, 0, j)),
        out_shape=jax.ShapeDtypeStruct((s, m_pad, sum(ns)), jnp.float32),
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,  # the shape in the name: traces tell q/k/v, o and down apart
        name=f"skinny_gemm_k{k}_n{'_'.join(map(str, ns))}")(x, *weights)
    return out[:, :m] if m_pad != m else out


def skinny_gemm_reference(x: jax.Array, weights: Sequence[jax.Array], *,
                          num_splits: int) -> jax.Array:
    """Pure jnp: the same partials, each slice's product in float32."""
    k = x.shape[1]
    ks = k // num_splits
    w = jnp.concatenate([jnp.asarray(w, jnp.float32) for w in weights], axis=1)
    x32 = x.astype(jnp.float32)
    return jnp.stack([x32[:, i * ks:(i + 1) * ks] @ w[i * ks:(i + 1) * ks]
                      for i in range(num_splits)])


def dual_product(x_ref, a_ref, a_cols, b_ref, b_cols, *, block_k: int, steps: int,
                 width: int) -> tuple[jax.Array, jax.Array]:
    """Float32 (x . a[:, a_cols], x . b[:, b_cols]) over the whole K of x_ref [M, K], walked in
    `steps` block_k steps (both products share each x tile); the column windows are `width`
    wide. The K loop of a kernel with an epilogue over two products (SwiGLU's gate and up)."""
    m = x_ref.shape[0]
    dims = (((1,), (0,)), ((), ()))

    def body(t, accs):
        acc_a, acc_b = accs
        rows = pl.ds(t * block_k, block_k)
        xs = x_ref[:, rows]
        return (acc_a + lax.dot_general(xs, a_ref[rows, a_cols], dims,
                                        preferred_element_type=jnp.float32),
                acc_b + lax.dot_general(xs, b_ref[rows, b_cols], dims,
                                        preferred_element_type=jnp.float32))

    zero = jnp.zeros((m, width), jnp.float32)
    return lax.fori_loop(0, steps, body, (zero, zero))


def _swiglu_kernel(x_ref,  # [M, K]
                   g_ref, u_ref,  # [K, I] gate and up weights (whole)
                   o_ref,  # [M, block_n]: this program's columns of h
                   *, block_n: int, block_k: int, steps: int, early_launch: bool):
    if early_launch:
        pdl.launch_dependents()
    cols = pl.ds(pl.program_id(0) * block_n, block_n)
    acc_g, acc_u = dual_product(x_ref, g_ref, cols, u_ref, cols, block_k=block_k, steps=steps,
                                width=block_n)
    dt = o_ref.dtype  # each product rounded to the model dtype, as the unfused model has them
    g, u = acc_g.astype(dt).astype(jnp.float32), acc_u.astype(dt).astype(jnp.float32)
    o_ref[...] = (g / (1.0 + jnp.exp(-g)) * u).astype(dt)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def skinny_gemm_swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, *,
                       config: SkinnyGemmConfig = SkinnyGemmConfig(num_splits=1),
                       interpret: bool = False) -> jax.Array:
    """silu(x @ gate) * (x @ up) [M, I] in x's dtype, for x [M, K] and gate, up [K, I].

    Raises:
      ValueError: shapes or dtypes that do not match, tiles that do not divide them, or
        config.num_splits != 1.
    """
    if x.ndim != 2 or gate.ndim != 2 or gate.shape != up.shape or gate.shape[0] != x.shape[1] \
            or {gate.dtype, up.dtype} != {x.dtype}:
        raise ValueError(f"skinny_gemm_swiglu: x [M, K] and gate, up [K, I] of one dtype; got "
                         f"x {x.shape} {x.dtype}, gate {gate.shape} {gate.dtype}, up {up.shape} "
                         f"{up.dtype}")
    if config.num_splits != 1:
        raise ValueError(f"skinny_gemm_swiglu: num_splits={config.num_splits}; the activation "
                         f"needs whole sums (num_splits=1)")
    m, k = x.shape
    i = gate.shape[1]
    why = config.fits(k, (i,))
    if why:
        raise ValueError(f"skinny_gemm_swiglu: x {x.shape}, gate/up {gate.shape}: {why}")
    m_pad = -(-m // ROW_ALIGN) * ROW_ALIGN
    if m_pad != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    kernel = functools.partial(_swiglu_kernel, block_n=config.block_n, block_k=config.block_k,
                               steps=k // config.block_k,
                               early_launch=pdl.enabled(interpret, "skinny_gemm_swiglu"))
    out = pl.pallas_call(
        kernel,
        grid=(i // config.block_n,),
        in_specs=[pl.BlockSpec((m_pad, k), lambda j: (0, 0)),
                  pl.BlockSpec(gate.shape, lambda j: (0, 0)),
                  pl.BlockSpec(up.shape, lambda j: (0, 0))],
        out_specs=pl.BlockSpec((m_pad, config.block_n), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, i), x.dtype),
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret, name=f"skinny_gemm_swiglu_k{k}_i{i}")(x, gate, up)
    return out[:m] if m_pad != m else out


def skinny_gemm_swiglu_reference(x: jax.Array, gate: jax.Array, up: jax.Array) -> jax.Array:
    """Pure jnp, as the unfused model computes it: each product in float32, rounded to x's
    dtype, then silu(g) * u in float32, rounded."""
    def product(w):
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)

    g, u = product(gate).astype(jnp.float32), product(up).astype(jnp.float32)
    return (jax.nn.silu(g) * u).astype(x.dtype)
