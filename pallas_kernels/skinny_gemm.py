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


def _row_inv_rms(ss_ref, dim: int, eps: float) -> jax.Array:
    """f32[M, 1]: 1 / rms of each row from its partial sums of squares ss [P, M]."""
    return lax.rsqrt(jnp.sum(ss_ref[...], axis=0) / dim + eps)[:, None]


def _normed(xs: jax.Array, inv: jax.Array, scale: jax.Array) -> jax.Array:
    """`layers.rms_norm` of the rows xs [M, k] given their 1 / rms `inv` [M, 1] and the scale's
    slice [k]: float32, rounded to xs's dtype, times the scale, rounded."""
    dt = xs.dtype
    y = (xs.astype(jnp.float32) * inv).astype(dt)
    return (y.astype(jnp.float32) * scale.astype(jnp.float32)[None, :]).astype(dt)


def _k_loop(x_ref, steps: int, block_k: int, normer, dots, init):
    """The K loop: `dots(t, x tile [M, block_k], carry) -> carry` for t < steps. With `normer`
    (inv [M, 1], scale_ref) the x tiles are normed (`_normed`), and loaded one step ahead as
    loop-carried values: Triton pipelines only the loads that feed a dot directly, and an x
    tile loaded in its own step put the load's whole latency into every step (gate/up took
    54.8 us instead of 28.8 in the 8B tp=2 step, bench/results/session21_h200x2)."""
    if normer is None:
        return lax.fori_loop(
            0, steps, lambda t, c: dots(t, x_ref[:, pl.ds(t * block_k, block_k)], c), init)
    inv, scale_ref = normer

    def load(t):
        ks = pl.ds(t * block_k, block_k)
        return x_ref[:, ks], scale_ref[ks]

    def body(t, carry):
        c, xv, sc = carry
        ahead = load(jnp.minimum(t + 1, steps - 1))
        return (dots(t, _normed(xv, inv, sc), c), *ahead)

    return lax.fori_loop(0, steps, body, (init, *load(0)))[0]


def _skinny_gemm_kernel(x_ref,  # [M, K / S]: this split's slice of the token rows
                        *refs,  # with norm: ss f32[P, M], scale [K / S]; then W weights
                        # [K, N_i] (whole), then out [M, block_n]
                        block_n: int, block_k: int, steps: int, block_bounds: tuple[int, ...],
                        norm: tuple[int, float] | None):
    normer = None
    if norm is not None:
        ss_ref, scale_ref, *refs = refs
        normer = (_row_inv_rms(ss_ref, *norm), scale_ref)
    *w_refs, o_ref = refs
    j, s = pl.program_id(0), pl.program_id(1)
    k_first = s * (steps * block_k)
    m = x_ref.shape[0]

    def product(w_ref, n_first):
        def dots(t, xs, acc):
            ws = w_ref[pl.ds(k_first + t * block_k, block_k), pl.ds(n_first, block_n)]
            return acc + lax.dot_general(xs, ws, (((1,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32)
        o_ref[...] = _k_loop(x_ref, steps, block_k, normer, dots,
                             jnp.zeros((m, block_n), jnp.float32))

    if len(w_refs) == 1:
        product(w_refs[0], j * block_n)
        return
    for i, w_ref in enumerate(w_refs):
        lo, hi = block_bounds[i], block_bounds[i + 1]

        @pl.when((j >= lo) & (j < hi))
        def _(w_ref=w_ref, lo=lo):
            product(w_ref, (j - lo) * block_n)


def _check_norm(x: jax.Array, row_sumsq: jax.Array | None, norm_scale: jax.Array | None,
                who: str) -> None:
    if (row_sumsq is None) != (norm_scale is None):
        raise ValueError(f"{who}: row_sumsq and norm_scale go together")
    if row_sumsq is not None and norm_scale is not None and (
            row_sumsq.ndim != 2 or row_sumsq.shape[1] != x.shape[0]
            or row_sumsq.dtype != jnp.float32 or norm_scale.shape != (x.shape[1],)):
        raise ValueError(f"{who}: row_sumsq {row_sumsq.shape} {row_sumsq.dtype} and norm_scale "
                         f"{norm_scale.shape} must be f32[P, M={x.shape[0]}] and [K={x.shape[1]}]")


def _norm_operands(row_sumsq: jax.Array, m_pad: int) -> jax.Array:
    """ss f32[P, M] zero-padded to [P', m_pad], P' the next power of two (Triton's blocks)."""
    p, m = row_sumsq.shape
    p_pad = 1 << max(0, (p - 1).bit_length())
    return jnp.pad(row_sumsq, ((0, p_pad - p), (0, m_pad - m)))


@functools.partial(jax.jit, static_argnames=("config", "eps", "interpret"))
def skinny_gemm(x: jax.Array, weights: Sequence[jax.Array], *,
                config: SkinnyGemmConfig = SkinnyGemmConfig(),
                row_sumsq: jax.Array | None = None, norm_scale: jax.Array | None = None,
                eps: float = 0.0, interpret: bool = False) -> jax.Array:
    """f32[S, M, sum N_i] split-K partials of x [M, K] times each of `weights` [K, N_i].

    With `row_sumsq` (f32[P, M]: partial sums of squares of x's rows, as `gemm_all_reduce`
    leaves them) and `norm_scale` [K], the product is of `layers.rms_norm(x, norm_scale, eps)`
    instead, applied to each x tile as it is loaded (x is then the un-normed residual stream).

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
    _check_norm(x, row_sumsq, norm_scale, "skinny_gemm")
    s = config.num_splits
    k_split = k // s
    m_pad = -(-m // ROW_ALIGN) * ROW_ALIGN
    if m_pad != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    bounds = [0]
    for n in ns:
        bounds.append(bounds[-1] + n // config.block_n)
    norm_specs, norm_args, norm = [], [], None
    if row_sumsq is not None and norm_scale is not None:
        ss = _norm_operands(row_sumsq, m_pad)
        norm_specs = [pl.BlockSpec(ss.shape, lambda j, s_: (0, 0)),  # ss: whole
                      pl.BlockSpec((k_split,), lambda j, s_: (s_,))]  # scale: split s_'s slice
        norm_args, norm = [ss, norm_scale], (k, float(eps))
    kernel = functools.partial(_skinny_gemm_kernel, block_n=config.block_n,
                               block_k=config.block_k, steps=k_split // config.block_k,
                               block_bounds=tuple(bounds), norm=norm)
    out = pl.pallas_call(
        kernel,
        grid=(bounds[-1], s),
        in_specs=[pl.BlockSpec((m_pad, k_split), lambda j, s_: (0, s_))]  # x: split s_'s slice
        + norm_specs
        + [pl.BlockSpec(w.shape, lambda j, s_: (0, 0)) for w in weights],  # weights: whole
        out_specs=pl.BlockSpec((None, m_pad, config.block_n), lambda j, s_: (s_, 0, j)),
        out_shape=jax.ShapeDtypeStruct((s, m_pad, sum(ns)), jnp.float32),
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,  # the shape in the name: traces tell q/k/v, o and down apart
        name=f"skinny_gemm_k{k}_n{'_'.join(map(str, ns))}{'_norm' if norm else ''}",
    )(x, *norm_args, *weights)
    return out[:, :m] if m_pad != m else out


def rms_norm_from_sumsq(x: jax.Array, row_sumsq: jax.Array, scale: jax.Array,
                        eps: float) -> jax.Array:
    """Pure jnp `layers.rms_norm` of x [M, K] whose rows' squares sum to sum(row_sumsq, 0)."""
    inv = jax.lax.rsqrt(jnp.sum(row_sumsq, axis=0) / x.shape[1] + eps)[:, None]
    y = (x.astype(jnp.float32) * inv).astype(x.dtype)
    return (y.astype(jnp.float32) * scale.astype(jnp.float32)).astype(x.dtype)


def skinny_gemm_reference(x: jax.Array, weights: Sequence[jax.Array], *,
                          num_splits: int, row_sumsq: jax.Array | None = None,
                          norm_scale: jax.Array | None = None, eps: float = 0.0) -> jax.Array:
    """Pure jnp: the same partials, each slice's product in float32 (of x normed as the
    kernel's `row_sumsq` / `norm_scale` say)."""
    if row_sumsq is not None and norm_scale is not None:
        x = rms_norm_from_sumsq(x, row_sumsq, norm_scale, eps)
    k = x.shape[1]
    ks = k // num_splits
    w = jnp.concatenate([jnp.asarray(w, jnp.float32) for w in weights], axis=1)
    x32 = x.astype(jnp.float32)
    return jnp.stack([x32[:, i * ks:(i + 1) * ks] @ w[i * ks:(i + 1) * ks]
                      for i in range(num_splits)])


def _swiglu_kernel(x_ref,  # [M, K]
                   *refs,  # with norm: ss f32[P, M], scale [K]; then the gate and up weights
                   # [K, I] (whole), out [M, block_n]: this program's columns of h
                   block_n: int, block_k: int, steps: int, norm: tuple[int, float] | None):
    normer = None
    if norm is not None:
        ss_ref, scale_ref, *refs = refs
        normer = (_row_inv_rms(ss_ref, *norm), scale_ref)
    g_ref, u_ref, o_ref = refs
    j = pl.program_id(0)
    m = x_ref.shape[0]
    cols = pl.ds(j * block_n, block_n)
    dims = (((1,), (0,)), ((), ()))

    def dots(t, xs, accs):
        acc_g, acc_u = accs
        rows = pl.ds(t * block_k, block_k)
        return (acc_g + lax.dot_general(xs, g_ref[rows, cols], dims,
                                        preferred_element_type=jnp.float32),
                acc_u + lax.dot_general(xs, u_ref[rows, cols], dims,
                                        preferred_element_type=jnp.float32))

    zero = jnp.zeros((m, block_n), jnp.float32)
    acc_g, acc_u = _k_loop(x_ref, steps, block_k, normer, dots, (zero, zero))
    dt = o_ref.dtype  # each product rounded to the model dtype, as the unfused model has them
    g, u = acc_g.astype(dt).astype(jnp.float32), acc_u.astype(dt).astype(jnp.float32)
    o_ref[...] = (g / (1.0 + jnp.exp(-g)) * u).astype(dt)


@functools.partial(jax.jit, static_argnames=("config", "eps", "interpret"))
def skinny_gemm_swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, *,
                       config: SkinnyGemmConfig = SkinnyGemmConfig(num_splits=1),
                       row_sumsq: jax.Array | None = None, norm_scale: jax.Array | None = None,
                       eps: float = 0.0, interpret: bool = False) -> jax.Array:
    """silu(x @ gate) * (x @ up) [M, I] in x's dtype, for x [M, K] and gate, up [K, I] (x
    normed first with `row_sumsq` / `norm_scale`, as `skinny_gemm`'s).

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
    _check_norm(x, row_sumsq, norm_scale, "skinny_gemm_swiglu")
    m_pad = -(-m // ROW_ALIGN) * ROW_ALIGN
    if m_pad != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
    norm_specs, norm_args, norm = [], [], None
    if row_sumsq is not None and norm_scale is not None:
        ss = _norm_operands(row_sumsq, m_pad)
        norm_specs = [pl.BlockSpec(ss.shape, lambda j: (0, 0)),  # ss: whole
                      pl.BlockSpec((k,), lambda j: (0,))]  # scale
        norm_args, norm = [ss, norm_scale], (k, float(eps))
    kernel = functools.partial(_swiglu_kernel, block_n=config.block_n, block_k=config.block_k,
                               steps=k // config.block_k, norm=norm)
    out = pl.pallas_call(
        kernel,
        grid=(i // config.block_n,),
        in_specs=[pl.BlockSpec((m_pad, k), lambda j: (0, 0))]
        + norm_specs
        + [pl.BlockSpec(gate.shape, lambda j: (0, 0)),
                  pl.BlockSpec(up.shape, lambda j: (0, 0))],
        out_specs=pl.BlockSpec((m_pad, config.block_n), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, i), x.dtype),
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=f"skinny_gemm_swiglu_k{k}_i{i}{'_norm' if norm else ''}")(x, *norm_args, gate, up)
    return out[:m] if m_pad != m else out


def skinny_gemm_swiglu_reference(x: jax.Array, gate: jax.Array, up: jax.Array, *,
                                 row_sumsq: jax.Array | None = None,
                                 norm_scale: jax.Array | None = None,
                                 eps: float = 0.0) -> jax.Array:
    """Pure jnp, as the unfused model computes it: each product in float32, rounded to x's
    dtype, then silu(g) * u in float32, rounded (x normed first as the kernel's)."""
    if row_sumsq is not None and norm_scale is not None:
        x = rms_norm_from_sumsq(x, row_sumsq, norm_scale, eps)
    def product(w):
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)

    g, u = product(gate).astype(jnp.float32), product(up).astype(jnp.float32)
    return (jax.nn.silu(g) * u).astype(x.dtype)
