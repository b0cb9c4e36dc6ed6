"""The tensor-parallel all-reduce fused with the residual add and RMSNorm, as a Pallas kernel.

Computes, on each of tp ranks (under shard_map over the model axis), for this rank's part x_r
[T, D] of a row-parallel product (or its float32 split-K partials [S, T, D], summed in order and
rounded first)::

    s      = sum over ranks r, in rank order, of x_r     (float32 sum, rounded once)
    x_new  = round(residual + s)
    h      = round(round(x_new * rsqrt(mean(x_new ** 2) + eps)) * scale)

``round`` is to residual's dtype: `layers.rms_norm(residual + psum(x))`, the same result as
sharding/all_reduce.py's PTX kernel (`AllReduce.add_rms_norm`). Rows from `rows` on are padding:
zeros in both outputs, not exchanged.

Why a second implementation: the PTX kernel is launched through jaxlib's Triton kernel-call
handler, which XLA launches without programmatic dependent launch (PDL) edges and whose thunk it
initializes on every execution; a Pallas Triton kernel is compiled and launched by XLA itself,
with PDL on Hopper (BENCHMARKS.md 0q). The exchange is the same idea as there (NCCL's "LL"):
each element goes to every peer as one 8-byte store {float32 bits, sequence number} and the
receiver spins on its own copy until the number matches. Program i (token row i) keeps a call
counter at word i of its rank's region; both ranks run the same calls, so their numbers agree
(padding rows skip the update on every rank alike). Data alternate between two slots by the
number's parity: a rank writes slot p of call c only after finishing call c - 1, for which its
peers had to finish call c - 2, the last reader of slot p. A wait longer than 10 s traps.

Region of each rank (bytes from its address; sharding/all_reduce.py allocates it in the
workspace): counters u32 [MAX_PROGRAMS] at 0; data at DATA_OFFSET,
[2 slots][tp sources][MAX_ROWS][MAX_COLS] x 8 bytes.

Layouts:
  x         [T, D] (residual's dtype) or f32[S, T, D]   this rank's part
  residual  [T, D]        the residual stream (the same on every rank)
  scale     [D]           the norm's scale
  rank      i32[1]        this rank's index on the model axis
  rows      i32[1]        the leading rows that carry tokens
  out       ([T, D], [T, D])  x_new and h

Algorithm: grid (T,), one program per row (D a power of two up to MAX_COLS, T <= MAX_ROWS). The
exchange is inline PTX (`st.volatile` / `ld.volatile` at the regions' addresses, compile-time
constants) through a side-effecting inline-asm primitive. With tp = 1 there is no exchange and
no PTX: the kernel runs interpreted on the CPU (the tests' path); tp > 1 needs NVIDIA GPUs with
peer access (sharding/all_reduce.py sets it up).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from xlaserve.pallas_kernels.ragged_paged_attention import compiler_params

MAX_PROGRAMS = 1024  # counters per region
MAX_ROWS = 128  # token rows per call
MAX_COLS = 8192  # D per call
DATA_OFFSET = 4 * MAX_PROGRAMS
TIMEOUT_NS = 10_000_000_000  # a wait this long traps instead of hanging


def region_bytes(tp: int) -> int:
    """Bytes of one rank's exchange region at this tp."""
    return DATA_OFFSET + 2 * tp * MAX_ROWS * MAX_COLS * 8


@dataclasses.dataclass(frozen=True)
class Exchange:
    """Where each rank's exchange region lies (byte addresses, in model-axis order). Frozen and
    hashable: a static argument (the addresses are constants of the compiled kernel)."""

    addresses: tuple[int, ...]

    @property
    def tp(self) -> int:
        return len(self.addresses)

    def __post_init__(self) -> None:
        if not self.addresses or any(a <= 0 or a % 16 for a in self.addresses):
            raise ValueError(f"Exchange.addresses={self.addresses}: one 16-byte aligned "
                             f"device address per rank")


# ----------------------------------------------------------------------------- inline PTX

def _asm_primitive():
    """A side-effecting elementwise inline-asm primitive for the Pallas Triton lowering.

    jax's `plgpu.elementwise_inline_asm` marks its asm pure: the compiler may drop it when its
    result is unused, merge identical ones and move it across loads and stores. Stores to a
    peer's memory and spin loops on our own need the opposite, so this primitive lowers to the
    same Triton op with pure=False and carries an effect (jax keeps it in the kernel jaxpr).
    Built lazily: the lowering modules are jax internals that only the GPU path needs.
    """
    from jax._src import core as jax_core
    from jax._src import effects
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import lowering
    from jax.interpreters import mlir

    class AsmEffect(jax_core.Effect):
        pass

    effect = AsmEffect()
    pallas_core.kernel_local_effects.add_type(AsmEffect)
    effects.control_flow_allowed_effects.add_type(AsmEffect)
    prim = jax_core.Primitive("xlaserve_volatile_asm")
    prim.multiple_results = True

    @prim.def_effectful_abstract_eval
    def _abstract(*avals, asm, constraints, results):
        del asm, constraints
        return [jax_core.ShapedArray(avals[0].shape, jnp.dtype(d)) for d in results], {effect}

    @lowering.register_lowering(prim)
    def _lower(ctx, *args, asm, constraints, results):
        out = tt_dialect.elementwise_inline_asm(
            [mlir.aval_to_ir_type(ctx.context.mlir_ctx, a) for a in ctx.avals_out], asm,
            constraints=constraints, pure=False, packed_element=1, args=list(args))
        return list(out) if len(results) > 1 else [out]  # pyright: ignore[reportArgumentType]

    return prim


_ASM = functools.cache(_asm_primitive)


def _asm(asm: str, constraints: str, *args: jax.Array, outs: int = 1) -> Any:
    """`outs` i32 results per element of the (same-shaped) i32 args (one array, or a list)."""
    got = _ASM().bind(*args, asm=asm, constraints=constraints, results=("int32",) * outs)
    return got[0] if outs == 1 else got


def _address(lo: str, hi: str, off: str) -> str:
    """PTX: %a = {hi:lo} + zero-extended u32 `off` (operand names like "$2")."""
    return (f".reg .b64 %a, %o; mov.b64 %a, {{{lo}, {hi}}}; cvt.u64.u32 %o, {off}; "
            f"add.u64 %a, %a, %o;")


# $0: out (0); $1 data, $2 lo, $3 hi, $4 byte offset, $5 active, $6 seq
_PUSH = ("{ .reg .pred %p; " + _address("$2", "$3", "$4")
         + " setp.ne.s32 %p, $5, 0; @%p st.volatile.global.v2.b32 [%a], {$1, $6}; "
         "mov.b32 $0, 0; }")
# A poll is two steps, so that a thread's loads are all in flight at once (a spin loop per
# element serialized them: 16 round trips per thread; session 21, call 3):
# _PEEK, $0 data, $1 flag (the seq where inactive); $2 lo, $3 hi, $4 byte offset, $5 active,
# $6 seq: one volatile load, no wait.
_PEEK = ("{ .reg .pred %p; " + _address("$2", "$3", "$4")
         + " mov.b32 $0, 0; mov.b32 $1, $6; setp.ne.s32 %p, $5, 0; "
         "@%p ld.volatile.global.v2.b32 {$0, $1}, [%a]; }")
# _SETTLE, $0 the data; $1 peeked data, $2 peeked flag, $3 lo, $4 hi, $5 byte offset, $6 seq:
# the peeked data if its flag is this call's, else spin on the line (a wait of TIMEOUT_NS traps).
_SETTLE = ("{ .reg .pred %p; .reg .b32 %f; .reg .b64 %t0, %t1; mov.b32 $0, $1; "
           "setp.eq.u32 %p, $2, $6; @%p bra DONE; " + _address("$3", "$4", "$5")
           + " mov.u64 %t0, %globaltimer; "
           "WAIT: ld.volatile.global.v2.b32 {$0, %f}, [%a]; setp.eq.u32 %p, %f, $6; "
           "@%p bra DONE; mov.u64 %t1, %globaltimer; sub.u64 %t1, %t1, %t0; "
           f"setp.gt.u64 %p, %t1, {TIMEOUT_NS}; @%p trap; bra WAIT; DONE: }}")
# $0: out (the word); $1 lo, $2 hi, $3 byte offset
_LOAD = "{ " + _address("$1", "$2", "$3") + " ld.volatile.global.u32 $0, [%a]; }"
# $0: out (0); $1 word, $2 lo, $3 hi, $4 byte offset, $5 active
_STORE = ("{ .reg .pred %p; " + _address("$2", "$3", "$4")
          + " setp.ne.s32 %p, $5, 0; @%p st.volatile.global.u32 [%a], $1; mov.b32 $0, 0; }")


def _i32(value: int) -> int:
    """The signed 32-bit integer with these low 32 bits."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _pick(index: jax.Array, values: tuple[int, ...], like: jax.Array) -> jax.Array:
    """values[index] (static int32 constants, dynamic index) broadcast like `like`."""
    out = jnp.full(like.shape, _i32(values[0]), jnp.int32)
    for i, val in enumerate(values[1:], 1):
        out = jnp.where(index == i, jnp.int32(_i32(val)), out)
    return out


# ----------------------------------------------------------------------------- kernel

def _all_reduce_norm_kernel(rank_ref,  # i32[1]
                            rows_ref,  # i32[1]
                            x_ref,  # [1, D] or f32[S, 1, D]: this rank's part of row i
                            res_ref,  # [1, D]
                            scale_ref,  # [D]
                            new_ref,  # [1, D]: x_new
                            h_ref,  # [1, D]: its RMSNorm
                            *, eps: float, addresses: tuple[int, ...]):
    i = pl.program_id(0)
    d = res_ref.shape[1]
    dt = res_ref.dtype
    tp = max(1, len(addresses))
    if len(x_ref.shape) == 3:  # split-K partials: summed in order, rounded
        part = x_ref[0].astype(jnp.float32)  # [1, D]
        for k in range(1, x_ref.shape[0]):
            part = part + x_ref[k].astype(jnp.float32)
    else:
        part = x_ref[...].astype(jnp.float32)
    own = part.astype(dt).astype(jnp.float32)  # [1, D]
    live = (jnp.zeros((1, d), jnp.int32) + i) < rows_ref[0]  # [1, D]: this row carries a token
    total = own
    if tp > 1:
        rank = rank_ref[0]
        col = lax.broadcasted_iota(jnp.int32, (1, d), 1)
        on = live.astype(jnp.int32)
        lo = tuple(a & 0xFFFFFFFF for a in addresses)
        hi = tuple(a >> 32 for a in addresses)
        my_lo, my_hi = _pick(rank, lo, col), _pick(rank, hi, col)
        counter = jnp.full((1, d), 4, jnp.int32) * i
        seq = _asm(_LOAD, "=r,r,r,r", my_lo, my_hi, counter) + 1
        slot = seq & 1

        def offset(src):  # bytes from a region's start to (slot, src, row i, col)
            return DATA_OFFSET + (((slot * tp + src) * MAX_ROWS + i) * MAX_COLS + col) * 8

        bits = lax.bitcast_convert_type(own, jnp.int32)
        pushed = jnp.zeros((1, d), jnp.int32)  # 0, once every push is issued
        for k in range(1, tp):
            dst = (rank + k) % tp
            pushed = pushed + _asm(_PUSH, "=r,r,r,r,r,r,r", bits, _pick(dst, lo, col),
                                   _pick(dst, hi, col), offset(rank), on, seq)
        received = {}  # k -> the values of rank (rank - k) mod tp
        peeked = {}
        for k in range(1, tp):  # every load in flight first ...
            off = offset((rank + tp - k) % tp) + pushed
            peeked[k] = (off, *_asm(_PEEK, "=r,=r,r,r,r,r,r", my_lo, my_hi, off, on, seq,
                                    outs=2))
        for k, (off, data, flag) in peeked.items():  # ... then wait where a line was not in
            got = _asm(_SETTLE, "=r,r,r,r,r,r,r", data, flag, my_lo, my_hi, off, seq)
            received[k] = lax.bitcast_convert_type(got, jnp.float32)
        terms = []
        for r in range(tp):  # the sum in rank order: the same bits on every rank
            term = own
            for k in range(1, tp):
                term = jnp.where((rank + tp - k) % tp == r, received[k], term)
            terms.append(term)
        total = functools.reduce(lambda a, b: a + b, terms)
        first = on * (col == 0).astype(jnp.int32)
        done = _asm(_STORE, "=r,r,r,r,r,r", seq, my_lo, my_hi, counter, first)
        total = total + done.astype(jnp.float32)  # done is 0: keeps the store in the kernel
    s = total.astype(dt).astype(jnp.float32)
    new = (res_ref[...].astype(jnp.float32) + s).astype(dt)
    new32 = new.astype(jnp.float32)
    inv = lax.rsqrt(jnp.sum(new32 * new32, axis=1, keepdims=True) / d + eps)
    y = (new32 * inv).astype(dt).astype(jnp.float32)
    h = (y * scale_ref[...].astype(jnp.float32)[None, :]).astype(dt)
    new_ref[...] = jnp.where(live, new, jnp.zeros_like(new))
    h_ref[...] = jnp.where(live, h, jnp.zeros_like(h))


@functools.partial(jax.jit, static_argnames=("eps", "exchange", "num_warps", "interpret"))
def all_reduce_add_rms_norm(x: jax.Array, residual: jax.Array, scale: jax.Array,
                            rank: jax.Array, rows: jax.Array, *, eps: float,
                            exchange: Exchange | None = None, num_warps: int = 8,
                            interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(x_new [T, D], h [T, D]) as the module docstring says. `exchange` None: one rank (no
    all-reduce; the tests' CPU path). Call under shard_map over the model axis.

    Raises:
      ValueError: shapes or dtypes that do not fit (named), or interpret with tp > 1.
    """
    t, d = residual.shape if residual.ndim == 2 else (0, 0)
    partials = x.ndim == 3
    want = ((x.shape[0], t, d) if partials else (t, d))
    if (residual.ndim != 2 or x.shape != want or not 0 < t <= MAX_ROWS or d > MAX_COLS
            or d & (d - 1) or scale.shape != (d,) or scale.dtype != residual.dtype
            or (x.dtype != jnp.float32 if partials else x.dtype != residual.dtype)
            or rank.shape != (1,) or rows.shape != (1,)):
        raise ValueError(f"all_reduce_add_rms_norm: x {x.shape} {x.dtype}, residual "
                         f"{residual.shape} {residual.dtype}, scale {scale.shape} {scale.dtype},"
                         f" rank {rank.shape}, rows {rows.shape}: needs residual [T <= "
                         f"{MAX_ROWS}, D] (D a power of two <= {MAX_COLS}), x like it or "
                         f"float32 partials [S, T, D], scale [D], rank and rows i32[1]")
    if exchange is not None and interpret:
        raise ValueError("all_reduce_add_rms_norm: the exchange runs PTX; interpret mode has "
                         "tp = 1 only")
    x_spec = (pl.BlockSpec((x.shape[0], 1, d), lambda i: (0, i, 0)) if partials
              else pl.BlockSpec((1, d), lambda i: (i, 0)))
    row = pl.BlockSpec((1, d), lambda i: (i, 0))
    kernel = functools.partial(_all_reduce_norm_kernel, eps=float(eps),
                               addresses=() if exchange is None else exchange.addresses)
    tp = 1 if exchange is None else exchange.tp
    return pl.pallas_call(
        kernel,
        grid=(t,),
        in_specs=[pl.BlockSpec((1,), lambda i: (0,)),  # rank
                  pl.BlockSpec((1,), lambda i: (0,)),  # rows
                  x_spec,  # x: row i (of every split)
                  row,  # residual: row i
                  pl.BlockSpec((d,), lambda i: (0,))],  # scale
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((t, d), residual.dtype)] * 2,
        compiler_params=compiler_params(num_warps, 1),
        interpret=interpret, name=f"all_reduce_add_rms_norm_tp{tp}_d{d}",
    )(rank.astype(jnp.int32), rows.astype(jnp.int32), x, residual, scale)


def all_reduce_add_rms_norm_reference(xs: jax.Array, residual: jax.Array, scale: jax.Array,
                                      rows: int, eps: float) -> tuple[jax.Array, jax.Array]:
    """Pure jnp, all ranks at once: xs [tp, T, D] (or f32 [tp, S, T, D]), each rank's part
    (partials summed in order, rounded), their float32 sum in rank order, rounded, plus the
    residual, rounded, then `layers.rms_norm`; rows from `rows` on zero."""
    dt = residual.dtype
    owns = []
    for x in xs:
        part = x.astype(jnp.float32)
        if x.ndim == 3:
            part = functools.reduce(lambda a, b: a + b, list(part))
        owns.append(part.astype(dt).astype(jnp.float32))
    total = functools.reduce(lambda a, b: a + b, owns)
    new = (residual.astype(jnp.float32) + total.astype(dt).astype(jnp.float32)).astype(dt)
    new32 = new.astype(jnp.float32)
    y = (new32 * lax.rsqrt(jnp.mean(new32 * new32, axis=-1, keepdims=True) + eps)).astype(dt)
    h = (y * scale).astype(dt)
    live = jnp.arange(residual.shape[0])[:, None] < rows
    return jnp.where(live, new, 0).astype(dt), jnp.where(live, h, 0).astype(dt)
