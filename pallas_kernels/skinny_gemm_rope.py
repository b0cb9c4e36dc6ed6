"""q/k/v of a decode-sized step in one launch: the skinny GEMM with rope and the K/V write as its
epilogue (an experiment: not yet measured on a GPU, not used by the model unless
XLASERVE_QKV_ROPE=1).

Computes what `skinny_gemm` (q/k/v partials) followed by `rope_write_kv` computes::

    y      = round(x @ [wq | wk | wv])              (float32 accumulation, rounded to x's dtype)
    q      = rope(y[:, q heads])                    -> out [T, N, H] (zero on padding rows)
    k, v   = rope(y[:, k heads]), y[:, v heads]     -> stored into their slots of the pages

Why: at batch 1 in the 8B model, rope_write_kv is a 2.1 us launch per layer at both tps after a
9 us q/k/v GEMM (bench/results/session27_h200x2). With one split (S = 1) a program holds whole
sums of its columns, so rope and the K/V write can be its epilogue and the partials never reach
memory. The risk, measured for other merges: the single-split GEMM may be slower than the
split-K one by what the launch saved.

Layouts:
  x             [M, K]        token rows (model dtype; M padded to a multiple of 16 inside)
  wq, wk, wv    [K, N H], [K, K' H], [K, K' H]   this device's q/k/v weights (N q heads, K'
                              KV heads, head dim H; heads, then head dim, in the columns)
  cos, sin      f32[M, H / 2] rope's tables for the rows' positions
  slot_mapping  i32[M]        page * L + offset of each row (unused for padding rows)
  rows          i32[1]        the real token rows (the rows after them are padding)
  k/v_pages     [K', P, L, H] the layer's pools, updated in place (aliased: donate them)
  out q         [M, N, H]

Algorithm: grid (N + 2K') * (H / 2) / hb programs; program p owns head h = p // (H / 2 / hb) and
the head-dim columns c .. c + hb and H/2 + c .. H/2 + c + hb (c = (p mod (H / 2 / hb)) hb): the
two halves that rope mixes. It walks K in block_k steps with two [M, block_k] x [block_k, hb]
dots (one float32 accumulator per half), rounds both sums to the dtype, rotates them (q and k
heads) and stores: q to out (padding rows zero), k and v to the slot of each real row (row t's
values picked out of the tile by a masked sum, one row after another).

Constraints: H / 2 a multiple of hb; hb, block_k powers of two >= 16; K a multiple of block_k;
N a multiple of K'.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from xlaserve.pallas_kernels.ragged_paged_attention import compiler_params
from xlaserve.pallas_kernels.rope_write_kv import rope_write_kv_reference
from xlaserve.pallas_kernels.skinny_gemm import (
    ROW_ALIGN,
    SkinnyGemmConfig,
    dual_product,
    skinny_gemm_reference,
)

# "1", or the tiles "hb,block_k,num_warps,num_stages": DecodeProjection.rope_write runs this
# kernel (the experiment) with the default tiles or those
ENV = "XLASERVE_QKV_ROPE"
DEFAULT_CONFIG = SkinnyGemmConfig(block_n=16, block_k=128, num_splits=1, num_warps=4,
                                  num_stages=4)


def config_from_env() -> SkinnyGemmConfig | None:
    """The tiles XLASERVE_QKV_ROPE asks the model's q/k/v hook to run this kernel with, or None
    (unset or "0": the skinny GEMM and rope_write_kv).

    Raises:
      ValueError: a value that is neither "0", "1" nor four integers, naming it.
    """
    value = os.environ.get(ENV, "")
    if value in ("", "0"):
        return None
    if value == "1":
        return DEFAULT_CONFIG
    try:
        hb, bk, warps, stages = (int(v) for v in value.split(","))
    except ValueError:
        raise ValueError(f"{ENV}={value!r}: '1' or 'hb,block_k,num_warps,num_stages'") from None
    return SkinnyGemmConfig(block_n=hb, block_k=bk, num_splits=1, num_warps=warps,
                            num_stages=stages)


def _skinny_gemm_rope_kernel(
    rows_ref,  # i32[1]
    slot_ref,  # i32[M]
    x_ref,  # [M, K]
    wq_ref,  # [K, N H]
    wk_ref,  # [K, K' H]
    wv_ref,  # [K, K' H]
    cos_ref,  # f32[M, H/2]
    sin_ref,  # f32[M, H/2]
    k_in_ref,  # [K', P, L, H] (aliased to k_out_ref; not read)
    v_in_ref,  # [K', P, L, H] (aliased to v_out_ref; not read)
    q_ref,  # [M, N, H]
    k_out_ref,  # [K', P, L, H]
    v_out_ref,  # [K', P, L, H]
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    half_block: int,
    block_k: int,
    steps: int,
    page_size: int,
):
    del k_in_ref, v_in_ref
    per_head = head_dim // 2 // half_block
    p = pl.program_id(0)
    head, c = p // per_head, (p % per_head) * half_block
    half = head_dim // 2
    m = x_ref.shape[0]
    dtype = q_ref.dtype
    row = lax.broadcasted_iota(jnp.int32, (m, half_block), 0)
    real = row < rows_ref[0]

    def halves(w_ref, h):  # the rounded sums of head h's columns c.. and half + c..
        lo, hi = pl.ds(h * head_dim + c, half_block), pl.ds(h * head_dim + half + c, half_block)
        a1, a2 = dual_product(x_ref, w_ref, lo, w_ref, hi, block_k=block_k, steps=steps,
                              width=half_block)
        return a1.astype(dtype).astype(jnp.float32), a2.astype(dtype).astype(jnp.float32)

    def rotated(y1, y2):
        cos, sin = cos_ref[:, pl.ds(c, half_block)], sin_ref[:, pl.ds(c, half_block)]
        return y1 * cos - y2 * sin, y2 * cos + y1 * sin

    def store_rows(out_ref, kh, y1, y2):  # each real row's values into its slot of the pages
        def body(t, carry):
            slot = slot_ref[t]
            page, offset = slot // page_size, slot % page_size
            pick = row == t
            r1 = jnp.sum(jnp.where(pick, y1, 0.0), axis=0)
            r2 = jnp.sum(jnp.where(pick, y2, 0.0), axis=0)
            out_ref[kh, page, offset, pl.ds(c, half_block)] = r1.astype(out_ref.dtype)
            out_ref[kh, page, offset, pl.ds(half + c, half_block)] = r2.astype(out_ref.dtype)
            return carry

        lax.fori_loop(0, rows_ref[0], body, 0)

    @pl.when(head < num_q_heads)
    def _():
        r1, r2 = rotated(*halves(wq_ref, head))
        q_ref[:, head, pl.ds(c, half_block)] = jnp.where(real, r1, 0.0).astype(dtype)
        q_ref[:, head, pl.ds(half + c, half_block)] = jnp.where(real, r2, 0.0).astype(dtype)

    @pl.when((head >= num_q_heads) & (head < num_q_heads + num_kv_heads))
    def _():
        kh = head - num_q_heads
        r1, r2 = rotated(*halves(wk_ref, kh))
        store_rows(k_out_ref, kh, r1.astype(dtype).astype(jnp.float32),
                   r2.astype(dtype).astype(jnp.float32))

    @pl.when(head >= num_q_heads + num_kv_heads)
    def _():
        kh = head - num_q_heads - num_kv_heads
        store_rows(v_out_ref, kh, *halves(wv_ref, kh))


def tiles_fit(config: SkinnyGemmConfig, head_dim: int, k: int) -> str | None:
    """None when `config` can run heads of `head_dim` over a contraction of `k`, else why not."""
    if config.num_splits != 1 or (head_dim // 2) % config.block_n or k % config.block_k:
        return (f"config {config}: needs num_splits 1, block_n (the half-tile) dividing "
                f"H/2={head_dim // 2} and block_k dividing K={k}")
    return None


def check_shapes(x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array, cos: jax.Array,
                 sin: jax.Array, slot_mapping: jax.Array, k_pages: jax.Array,
                 v_pages: jax.Array, config: SkinnyGemmConfig) -> None:
    """Raises ValueError naming the argument whose shape, dtype or tile does not fit."""
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"skinny_gemm_rope: k_pages and v_pages must both be [K', P, L, H], "
                         f"got {k_pages.shape} and {v_pages.shape}")
    kv, _, _, h = k_pages.shape
    if x.ndim != 2:
        raise ValueError(f"skinny_gemm_rope: x must be [M, K], got {x.shape}")
    m, k = x.shape
    for name, w, n in (("wq", wq, None), ("wk", wk, kv * h), ("wv", wv, kv * h)):
        if (w.ndim != 2 or w.shape[0] != k or w.dtype != x.dtype
                or (n is not None and w.shape[1] != n) or w.shape[1] % h):
            raise ValueError(f"skinny_gemm_rope: {name} {w.shape} {w.dtype} must be [K={k}, "
                             f"heads * H={h}] of x's dtype {x.dtype}")
    if (wq.shape[1] // h) % kv:
        raise ValueError(f"skinny_gemm_rope: {wq.shape[1] // h} q heads are not a multiple of "
                         f"the pages' {kv} KV heads")
    if cos.shape != (m, h // 2) or sin.shape != cos.shape:
        raise ValueError(f"skinny_gemm_rope: cos {cos.shape} and sin {sin.shape} must be "
                         f"[M={m}, H/2={h // 2}]")
    if slot_mapping.shape != (m,) or slot_mapping.dtype != jnp.int32:
        raise ValueError(f"skinny_gemm_rope: slot_mapping {slot_mapping.shape} "
                         f"{slot_mapping.dtype} must be i32[M={m}]")
    why = tiles_fit(config, h, k)
    if why:
        raise ValueError(f"skinny_gemm_rope: {why}")


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def skinny_gemm_rope(x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array,
                     cos: jax.Array, sin: jax.Array, slot_mapping: jax.Array,
                     k_pages: jax.Array, v_pages: jax.Array, rows: jax.Array | None = None, *,
                     config: SkinnyGemmConfig = DEFAULT_CONFIG,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q [M, N, H] with rope, k_pages, v_pages with the real rows' K/V stored): see the module
    docstring. `config.block_n` is the half-tile hb (each program: 2 hb columns of one head).
    The pools are aliased to the outputs (donate them, or XLA copies the pools).

    Raises:
      ValueError: shapes, dtypes or tiles that do not fit (named).
    """
    check_shapes(x, wq, wk, wv, cos, sin, slot_mapping, k_pages, v_pages, config)
    kv, num_pages, page_size, h = k_pages.shape
    m, k = x.shape
    n_q = wq.shape[1] // h
    m_pad = -(-m // ROW_ALIGN) * ROW_ALIGN
    pad = m_pad - m
    if rows is None:
        rows = jnp.full((1,), m, jnp.int32)
    slots = jnp.clip(slot_mapping, 0, num_pages * page_size - 1)  # never write out of the pool
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        cos, sin = (jnp.pad(a, ((0, pad), (0, 0))) for a in (cos, sin))
        slots = jnp.pad(slots, (0, pad))
    per_head = h // 2 // config.block_n
    whole = lambda *shape: pl.BlockSpec(shape, lambda p: (0,) * len(shape))  # noqa: E731
    kernel = functools.partial(
        _skinny_gemm_rope_kernel, num_q_heads=n_q, num_kv_heads=kv, head_dim=h,
        half_block=config.block_n, block_k=config.block_k, steps=k // config.block_k,
        page_size=page_size)
    q, k_pages, v_pages = pl.pallas_call(
        kernel,
        grid=((n_q + 2 * kv) * per_head,),
        in_specs=[whole(1), whole(m_pad), whole(m_pad, k), whole(*wq.shape), whole(*wk.shape),
                  whole(*wv.shape), whole(m_pad, h // 2), whole(m_pad, h // 2),
                  whole(*k_pages.shape), whole(*v_pages.shape)],
        out_specs=(whole(m_pad, n_q, h), whole(*k_pages.shape), whole(*v_pages.shape)),
        out_shape=(jax.ShapeDtypeStruct((m_pad, n_q, h), x.dtype),
                   jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)),
        input_output_aliases={8: 1, 9: 2},
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret,
        name=f"skinny_gemm_rope_k{k}_n{n_q}_kv{kv}",
    )(rows, slots, x, wq, wk, wv, cos, sin, k_pages, v_pages)
    return (q[:m] if pad else q), k_pages, v_pages


def skinny_gemm_rope_reference(x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array,
                               cos: jax.Array, sin: jax.Array, slot_mapping: jax.Array,
                               k_pages: jax.Array, v_pages: jax.Array,
                               rows: jax.Array | None = None,
                               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pure jnp: the one-split product (skinny_gemm_reference), then rope_write_kv_reference."""
    parts = skinny_gemm_reference(x, (wq, wk, wv), num_splits=1)
    return rope_write_kv_reference(parts, cos, sin, slot_mapping, k_pages, v_pages, rows,
                                   num_q_heads=wq.shape[1] // k_pages.shape[-1], dtype=x.dtype)
