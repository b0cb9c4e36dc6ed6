"""L2 prefetch of a later kernel's operand from inside a latency-bound Pallas Triton kernel.

In a batch-1 decode step HBM idles while latency-bound kernels run (attention over a short
context, rope_write_kv): at tp=2 on the 8B model about 10 us per layer. The GEMM after them
(o_proj) then streams its weight from HBM at ~2.7 TB/s for ~6 us. If the kernel before it asks
the L2 cache (50 MB on H100 / H200) for that weight while it waits on its own latencies, the
GEMM reads L2 instead.

`prefetch_share(ref, program, programs, num_threads)` makes program `program` of `programs`
issue `cp.async.bulk.prefetch.L2.global` (PTX ISA 8.0, sm_90: a bulk, fire-and-forget request
that fills L2 without touching shared memory or registers) for its share of `ref`'s bytes,
one contiguous piece per thread. It changes no value: a prefetch is a hint, and the kernel that
later reads the operand reads it as before (from L2 when the lines are still there).

`enabled(interpret, site)` says whether a kernel traced now prefetches at `site` (one of SITES):
compiled kernels on compute capability 9.0 or later only, at the sites XLASERVE_L2_PREFETCH
lists (an A/B switch for bench/, read when a kernel is traced: "0" or unset none, "1" all, or
a comma list). Interpreted kernels never do (the CPU has no L2 to fill; the operand is then
not passed at all).
"""

from __future__ import annotations

import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
from jax import lax

from xlaserve.pallas_kernels import pdl

log = logging.getLogger(__name__)

ENV = "XLASERVE_L2_PREFETCH"
# attention: ragged_paged_attention prefetches o_proj's weight as each program starts;
# attention_end: after each program's work (its own loads then no longer queue behind the
# prefetch's)
SITES = ("attention", "attention_end")
DEFAULT_SITES: tuple[str, ...] = ()
# One piece per thread; a zero size skips the instruction (the last programs' pieces may be
# empty). Addresses and sizes are multiples of 16 bytes (the instruction's alignment).
PTX = ("{ .reg .pred %p; setp.ne.u32 %p, $2, 0; "
       "@%p cp.async.bulk.prefetch.L2.global [$1], $2; }")


@functools.cache
def _primitive():
    """A side-effecting primitive on (ref, element offsets i32[n], byte sizes i32[n]) for the
    Pallas Triton lowering: thread i of the program prefetches sizes[i] bytes from
    ref + offsets[i]. Built on first use (jax internals that only the GPU path needs)."""
    from jax._src import core as jax_core
    from jax._src import effects
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import lowering
    from jax.interpreters.mlir import ir

    class PrefetchEffect(jax_core.Effect):
        pass

    effect = PrefetchEffect()
    pallas_core.kernel_local_effects.add_type(PrefetchEffect)
    effects.control_flow_allowed_effects.add_type(PrefetchEffect)
    prim = jax_core.Primitive("xlaserve_l2_prefetch")

    @prim.def_effectful_abstract_eval
    def _abstract(ref, offsets, sizes):
        del ref, sizes
        return jax_core.ShapedArray(offsets.shape, jnp.int32), {effect}

    @lowering.register_lowering(prim)
    def _lower(ctx, ptr, offsets, sizes):
        del ctx
        shape = ir.RankedTensorType(offsets.type).shape
        ptrs = tt_dialect.splat(ir.RankedTensorType.get(shape, ptr.type), ptr)
        ptrs = tt_dialect.addptr(ptrs.type, ptrs, offsets)
        i64 = ir.RankedTensorType.get(shape, ir.IntegerType.get_signless(64))
        addresses = tt_dialect.ptr_to_int(i64, ptrs)
        i32 = ir.RankedTensorType.get(shape, ir.IntegerType.get_signless(32))
        # "=r": an i32 result per element that the asm leaves unset and nothing reads
        return tt_dialect.elementwise_inline_asm([i32], PTX, constraints="=r,l,r", pure=False,
                                                 packed_element=1, args=[addresses, sizes])

    return prim


def pieces(program: jax.Array, programs: int, num_threads: int, total: int,
           ) -> tuple[jax.Array, jax.Array]:
    """(start, size) i32[num_threads]: the byte ranges of program `program`'s threads when
    `programs` programs split `total` bytes (a multiple of 16). Every piece starts at a
    multiple of 16 and is 16 * ceil(total / (programs * threads * 16)) bytes or shorter (the
    last ones, down to 0: the instruction is then skipped); together they cover [0, total) once.
    """
    piece = -(-total // (programs * num_threads))
    piece = -(-piece // 16) * 16
    thread = lax.broadcasted_iota(jnp.int32, (num_threads,), 0)
    start = (program * num_threads + thread) * piece
    return jnp.minimum(start, total), jnp.clip(total - start, 0, piece)


def prefetch_share(ref, program: jax.Array, programs: int, num_threads: int) -> None:
    """Has program `program` (traced i32 scalar, 0 <= program < programs) ask L2 for its
    1/programs share of `ref` (a whole-array ref of the kernel), one piece per thread
    (`pieces`). Call it only in compiled kernels where `enabled()` holds.

    Raises:
      ValueError: ref's bytes are not a multiple of 16, or 2 GiB or more.
    """
    itemsize = jnp.dtype(ref.dtype).itemsize
    total = math.prod(ref.shape) * itemsize
    if total % 16 or total >= 2 ** 31:
        raise ValueError(f"L2 prefetch of {ref.shape} {ref.dtype}: {total} bytes, must be a "
                         "multiple of 16 below 2 GiB (32-bit offsets)")
    start, sizes = pieces(program, programs, num_threads, total)
    # an empty piece's address stays in bounds (its instruction does not run)
    offsets = jnp.minimum(start, total - 16) // itemsize  # in elements: addptr's unit
    _primitive().bind(ref, offsets, sizes)


def sites() -> tuple[str, ...]:
    """The sites that prefetch: XLASERVE_L2_PREFETCH's ("0" none, "1" all, a comma list) or
    DEFAULT_SITES.

    Raises:
      ValueError: a name in the list that is not a site.
    """
    setting = os.environ.get(ENV, "").strip()
    if not setting:
        return DEFAULT_SITES
    if setting in ("0", "1"):
        return SITES if setting == "1" else ()
    chosen = tuple(s.strip() for s in setting.split(","))
    bad = [s for s in chosen if s not in SITES]
    if bad:
        raise ValueError(f"{ENV}={setting!r}: {bad} not among {SITES} (or 0 / 1)")
    return chosen


def describe() -> str:
    """One line for `xlaserve profile` and logs: where compiled kernels prefetch, or why not."""
    why = pdl.unsupported()  # the same requirement: sm_90 (cp.async.bulk)
    if why:
        return f"off: {why}"
    chosen = sites()
    source = f"{ENV}={os.environ[ENV]!r}" if os.environ.get(ENV) else "the default"
    return (f"cp.async.bulk.prefetch.L2 of the next GEMM's weight in {', '.join(chosen)} "
            f"({source})" if chosen else f"off ({source})")


@functools.cache
def _log_once(message: str) -> None:
    log.info("L2 prefetch: %s", message)


def enabled(interpret: bool, site: str) -> bool:
    """Whether a kernel traced now prefetches at `site` (see the module docstring)."""
    if site not in SITES:
        raise ValueError(f"l2 prefetch site={site!r}: must be one of {SITES}")
    if interpret:
        return False
    chosen = sites()  # a bad XLASERVE_L2_PREFETCH raises on any platform
    _log_once(describe())
    return pdl.unsupported() is None and site in chosen
