"""Row-parallel GEMM with its all-reduce, residual add and RMSNorm statistics in the epilogue.

Computes, on each of tp ranks (the devices of one tensor-parallel group, under shard_map), for
this rank's x_r [M, K] and weight slice w_r [K, N] (o_proj / down_proj: the contraction is split
over the ranks)::

    s    = sum over ranks r, in rank order, of round(x_r @ w_r)     (float32 sum, rounded once)
    v    = round(residual + s)                                      [M, N] the new residual
    ss   = sum over each program's columns of float32(v) ** 2       f32 [N / block_n, M]

``round`` is to x's dtype, so `v` is exactly what the plain path computes (psum of the rounded
products, then the residual add). The rows from `rows` on are padding: v and ss are zero there and
they are not exchanged. The next RMSNorm needs only ``sum(ss, 0)`` and v: the consumer GEMM
(`skinny_gemm(..., row_sumsq=ss)`) applies the norm to its x tiles as it loads them, so the
all-reduce, the add and the norm need no kernel of their own.

Why: at tensor parallelism every decode layer ran o_proj's GEMM, a fused all-reduce + add + norm
kernel, and the same again after down_proj. The all-reduce kernel took ~4.2 us and its two launch
gaps ~1.4 us each in the tp=2 step (bench/results/session15_h200x2, session20), ~0.35 ms of the
8B batch-1 step's ~2.9 ms. Here each program pushes its tile to the peers as soon as its sum is
done, so the NVLink latency overlaps the other programs' work, and the next kernel starts
straight after.

Exchange (NCCL's "LL" idea, as sharding/all_reduce.py): each element goes to every peer as one
8-byte store {float32 bits, sequence number}; the receiver spins on its own copy until the
number matches, so no fence or separate flag is needed. Program j keeps a call counter at word j
of its rank's region; both ranks run the same calls, so their numbers agree. Data alternate
between two slots by the number's parity: a rank writes slot p of call c only after finishing
call c - 1, for which its peers had to finish call c - 2, the last reader of slot p. A wait
longer than 10 s traps (a device error that fails the step) instead of hanging.

Region of each rank (bytes from its address): counters u32 [MAX_PROGRAMS] at 0; data at
DATA_OFFSET, [2 slots][tp sources][MAX_ROWS][MAX_COLS] x 8 bytes.

Layouts:
  x         [M, K]        this rank's rows of the contraction (M <= 16, padded to 16 inside)
  w         [K, N]        this rank's slice of the weight, x's dtype
  residual  [M, N]        the residual stream (the same on every rank)
  rank      i32[1]        this rank's index on the model axis
  rows      i32[1]        the leading rows that carry tokens
  v         [M, N]        out: residual + the all-reduced product (rounded)
  ss        f32[P, M]     out: program p's sum of v ** 2 over its block_n columns

Algorithm: grid (N / block_n,). Program j owns columns j * block_n .. + block_n and the whole
contraction (one split: the exchange needs whole sums), walked in block_k steps as
`skinny_gemm`. Its epilogue runs inline PTX (`st.volatile` / `ld.volatile` at the regions'
addresses, which are compile-time constants) through a side-effecting inline-asm primitive.
With tp = 1 there is no exchange and no PTX: the kernel runs interpreted on the CPU (the
tests' path); tp > 1 needs NVIDIA GPUs with peer access (sharding/all_reduce.py sets it up).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from xlaserve.pallas_kernels.ragged_paged_attention import compiler_params
from xlaserve.pallas_kernels.skinny_gemm import ROW_ALIGN, SkinnyGemmConfig

MAX_PROGRAMS = 1024  # counters per region (programs of one launch)
MAX_ROWS = ROW_ALIGN  # token rows per call (decode steps of up to 16 rows)
MAX_COLS = 16384  # N (the hidden size) per call
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
        del results
        return [tt_dialect.elementwise_inline_asm(
            [mlir.aval_to_ir_type(ctx.context.mlir_ctx, a) for a in ctx.avals_out], asm,
            constraints=constraints, pure=False, packed_element=1, args=list(args))]

    return prim


_ASM = functools.cache(_asm_primitive)


def _asm(asm: str, constraints: str, *args: jax.Array) -> jax.Array:
    """One i32 result per element of the (same-shaped) i32 args."""
    return _ASM().bind(*args, asm=asm, constraints=constraints, results=("int32",))[0]


def _address(lo: str, hi: str, off: str) -> str:
    """PTX: %a = {hi:lo} + zero-extended u32 `off` (operand names like "$2")."""
    return (f".reg .b64 %a, %o; mov.b64 %a, {{{lo}, {hi}}}; cvt.u64.u32 %o, {off}; "
            f"add.u64 %a, %a, %o;")


# $0: out (0); $1 data, $2 lo, $3 hi, $4 byte offset, $5 active, $6 seq
_PUSH = ("{ .reg .pred %p; " + _address("$2", "$3", "$4")
         + " setp.ne.s32 %p, $5, 0; @%p st.volatile.global.v2.b32 [%a], {$1, $6}; "
         "mov.b32 $0, 0; }")
# $0: out (the data, 0 where inactive); $1 lo, $2 hi, $3 byte offset, $4 active, $5 seq
_POLL = ("{ .reg .pred %p; .reg .b32 %f; .reg .b64 %t0, %t1; " + _address("$1", "$2", "$3")
         + " mov.b32 $0, 0; setp.eq.s32 %p, $4, 0; @%p bra DONE; "
         "mov.u64 %t0, %globaltimer; "
         "WAIT: ld.volatile.global.v2.b32 {$0, %f}, [%a]; setp.eq.u32 %p, %f, $5; @%p bra DONE; "
         "mov.u64 %t1, %globaltimer; sub.u64 %t1, %t1, %t0; "
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

def _gemm_all_reduce_kernel(rank_ref,  # i32[1]
                            rows_ref,  # i32[1]
                            x_ref,  # [M, K]
                            w_ref,  # [K, N] (whole)
                            res_ref,  # [M, block_n]: the residual's columns of this program
                            v_ref,  # [M, block_n]
                            ss_ref,  # f32[M]: this program's row of ss
                            *, block_n: int, block_k: int, steps: int,
                            addresses: tuple[int, ...]):
    j = pl.program_id(0)
    m = x_ref.shape[0]
    tp = max(1, len(addresses))

    def body(t, acc):
        ks = pl.ds(t * block_k, block_k)
        return acc + lax.dot_general(x_ref[:, ks], w_ref[ks, pl.ds(j * block_n, block_n)],
                                     (((1,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((m, block_n), jnp.float32))
    dt = v_ref.dtype
    own = acc.astype(dt).astype(jnp.float32)  # this rank's product, rounded as the plain path's
    row = lax.broadcasted_iota(jnp.int32, (m, block_n), 0)
    active = row < rows_ref[0]
    total = own
    if tp > 1:
        rank = rank_ref[0]
        col = j * block_n + lax.broadcasted_iota(jnp.int32, (m, block_n), 1)
        on = active.astype(jnp.int32)
        lo = tuple(a & 0xFFFFFFFF for a in addresses)
        hi = tuple(a >> 32 for a in addresses)
        my_lo, my_hi = _pick(rank, lo, row), _pick(rank, hi, row)
        counter = jnp.full((m, block_n), 4, jnp.int32) * j
        seq = _asm(_LOAD, "=r,r,r,r", my_lo, my_hi, counter) + 1
        slot = seq & 1

        def offset(src):  # bytes from a region's start to (slot, src, row, col)
            return DATA_OFFSET + (((slot * tp + src) * MAX_ROWS + row) * MAX_COLS + col) * 8

        bits = lax.bitcast_convert_type(own, jnp.int32)
        pushed = jnp.zeros((m, block_n), jnp.int32)  # 0, once every push is issued
        for i in range(1, tp):
            dst = (rank + i) % tp
            pushed = pushed + _asm(_PUSH, "=r,r,r,r,r,r,r", bits, _pick(dst, lo, row),
                                   _pick(dst, hi, row), offset(rank), on, seq)
        received = {}  # i -> the values of rank (rank - i) mod tp
        for i in range(1, tp):
            src = (rank + tp - i) % tp
            got = _asm(_POLL, "=r,r,r,r,r,r", my_lo, my_hi, offset(src) + pushed, on, seq)
            received[i] = lax.bitcast_convert_type(got, jnp.float32)
        total = None
        for r in range(tp):  # the sum in rank order, the same bits on every rank
            term = own
            for i in range(1, tp):
                term = jnp.where((rank + tp - i) % tp == r, received[i], term)
            total = term if total is None else total + term
        first = ((row == 0) & (col == j * block_n)).astype(jnp.int32)
        done = _asm(_STORE, "=r,r,r,r,r,r", seq, my_lo, my_hi, counter, first)
        total = total + done.astype(jnp.float32)  # done is 0: keeps the store in the kernel
    s = total.astype(dt).astype(jnp.float32)
    v = jnp.where(active, (res_ref[...].astype(jnp.float32) + s).astype(dt), 0).astype(dt)
    v_ref[...] = v
    v32 = v.astype(jnp.float32)
    ss_ref[...] = jnp.sum(v32 * v32, axis=1)


@functools.partial(jax.jit, static_argnames=("config", "exchange", "interpret"))
def gemm_all_reduce(x: jax.Array, w: jax.Array, residual: jax.Array, rank: jax.Array,
                    rows: jax.Array, *, config: SkinnyGemmConfig,
                    exchange: Exchange | None = None,
                    interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """(v [M, N], ss f32[N / block_n, M]) as the module docstring says. `exchange` None: one
    rank (no all-reduce; the tests' CPU path). Call under shard_map over the model axis.

    Raises:
      ValueError: shapes, dtypes or tiles that do not fit (named), or interpret with tp > 1.
    """
    m, k = x.shape if x.ndim == 2 else (0, 0)
    n = w.shape[1] if w.ndim == 2 else 0
    if (x.ndim != 2 or w.shape != (k, n) or residual.shape != (m, n) or w.dtype != x.dtype
            or residual.dtype != x.dtype or not 0 < m <= MAX_ROWS or n > MAX_COLS
            or rank.shape != (1,) or rows.shape != (1,)):
        raise ValueError(f"gemm_all_reduce: x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, "
                         f"residual {residual.shape} {residual.dtype}, rank {rank.shape}, rows "
                         f"{rows.shape}: needs x [M <= {MAX_ROWS}, K], w [K, N <= {MAX_COLS}] "
                         f"and residual [M, N] of one dtype, rank and rows i32[1]")
    why = config.fits(k, (n,))
    if why or config.num_splits != 1:
        raise ValueError(f"gemm_all_reduce: x {x.shape}, w {w.shape}: "
                         f"{why or f'num_splits={config.num_splits} (the exchange needs 1)'}")
    if exchange is not None and interpret:
        raise ValueError("gemm_all_reduce: the exchange runs PTX; interpret mode has tp = 1 only")
    if n // config.block_n > MAX_PROGRAMS:
        raise ValueError(f"gemm_all_reduce: {n // config.block_n} programs > {MAX_PROGRAMS}")
    m_pad = ROW_ALIGN
    if m_pad != m:
        x = jnp.pad(x, ((0, m_pad - m), (0, 0)))
        residual = jnp.pad(residual, ((0, m_pad - m), (0, 0)))
    p = n // config.block_n
    kernel = functools.partial(_gemm_all_reduce_kernel, block_n=config.block_n,
                               block_k=config.block_k, steps=k // config.block_k,
                               addresses=() if exchange is None else exchange.addresses)
    tp = 1 if exchange is None else exchange.tp
    v, ss = pl.pallas_call(
        kernel,
        grid=(p,),
        in_specs=[pl.BlockSpec((1,), lambda j: (0,)),  # rank
                  pl.BlockSpec((1,), lambda j: (0,)),  # rows
                  pl.BlockSpec((m_pad, k), lambda j: (0, 0)),  # x: whole
                  pl.BlockSpec((k, n), lambda j: (0, 0)),  # w: whole
                  pl.BlockSpec((m_pad, config.block_n), lambda j: (0, j))],  # residual
        out_specs=[pl.BlockSpec((m_pad, config.block_n), lambda j: (0, j)),  # v
                   pl.BlockSpec((None, m_pad), lambda j: (j, 0))],  # ss: row j
        out_shape=[jax.ShapeDtypeStruct((m_pad, n), x.dtype),
                   jax.ShapeDtypeStruct((p, m_pad), jnp.float32)],
        compiler_params=compiler_params(config.num_warps, config.num_stages),
        interpret=interpret, name=f"gemm_all_reduce_tp{tp}_k{k}_n{n}",
    )(rank.astype(jnp.int32), rows.astype(jnp.int32), x, w, residual)
    return v[:m], ss[:, :m]


def gemm_all_reduce_reference(xs: jax.Array, ws: jax.Array, residual: jax.Array,
                              rows: int, block_n: int) -> tuple[jax.Array, jax.Array]:
    """Pure jnp, all ranks at once: xs [tp, M, K], ws [tp, K, N] (rank r's x and weight slice).
    Each rank's product in float32, rounded; their float32 sum in rank order, rounded; plus the
    residual, rounded; rows from `rows` on zero. Returns (v [M, N], ss f32[N / block_n, M])."""
    dt = residual.dtype
    total = None
    for x, w in zip(xs, ws):
        own = jnp.dot(x, w, preferred_element_type=jnp.float32).astype(dt).astype(jnp.float32)
        total = own if total is None else total + own
    s = total.astype(dt).astype(jnp.float32)
    v = (residual.astype(jnp.float32) + s).astype(dt)
    m, n = residual.shape
    v = jnp.where(jnp.arange(m)[:, None] < rows, v, jnp.zeros_like(v))
    v32 = v.astype(jnp.float32).reshape(m, n // block_n, block_n)
    return v, jnp.sum(v32 * v32, axis=2).T
