"""Programmatic dependent launch (PDL) from inside a Pallas Triton kernel.

On Hopper XLA launches the Pallas Triton kernels of a step (`__gpu$xla.gpu.triton` custom
calls) as PDL secondaries: the kernel may be scheduled before the kernel ahead of it has ended,
and XLA puts `griddepcontrol.wait` (wait until the grids ahead have completed and their memory
is visible) at the start of the kernel. A grid lets its dependents be scheduled either when all
its CTAs have exited, or earlier, once every CTA has executed `griddepcontrol.launch_dependents`
(PTX ISA, "griddepcontrol"). XLA emits that instruction in its own GEMM fusions only, so after
one of our kernels the next kernel is scheduled only as our CTAs exit.

`launch_dependents()` emits the instruction from a kernel body, so the next kernel's CTAs are
resident, waiting at its own `griddepcontrol.wait`, while this kernel's last CTAs still run.
It changes no data dependency: the dependent still waits for this whole grid to end and flush.
A dependent that is not launched as a PDL secondary is unaffected (the instruction is then a
no-op).

`enabled(interpret, family)` says whether a kernel of `family` (one of FAMILIES) emits it:
compiled kernels on a GPU of compute capability 9.0 or later (the instruction does not exist
before sm_90), of the families in DEFAULT_FAMILIES. XLASERVE_EARLY_LAUNCH (an A/B switch for
bench/, read when a kernel is traced) overrides the families: "0" none, "1" all, or a comma
list. Interpreted kernels never emit it.

Which families, measured in the 8B batch-1 decode step on 2 x H200 (steady-state step, ms;
three device calls, "|" between them, each call's runs A/B on one pair of GPUs in the order
given; bench/results/session23_h200x2/README.md):

  triggers in                  tp=2                                tp=1
  none                         2.753, 2.753 | 2.778* | 2.739, 2.737  4.328 | 4.333, 4.328
  all four families            2.727*, 2.715 | 2.728 | -             4.385, 4.383 | 4.356
  all but skinny_gemm_swiglu   - | 2.745 | -                         - | 4.342, 4.355
  skinny_gemm_swiglu only      - | 2.731 | 2.731                     - | 4.338
  (* the call's first run at that tp)

Session 25 (bench/results/session25_h200x2/README.md), one call: at tp=2 every family 2.734,
2.738 against the default's 2.733, 2.760 (no gain); at tp=1 the default plus one family:
skinny_gemm (q/k/v) 4.401, rope_write_kv 4.404, ragged_paged_attention 4.375, against the
default's 4.368-4.377. So q/k/v's GEMM and rope_write_kv are the triggers that cost tp=1.
Session 29 (bench/results/session29_h200x2/README.md), the question being a per-tp default: at
tp=2 every family against the default, alternated, -5 us over six pairs on one host and -15
over three on another: within the spread, so no per-tp default.

All four families take 26-38 us off tp=2 (the idle between gate/up and down_proj, and between
q/k/v and rope_write_kv, goes) but add 20-55 us at tp=1, where XLA's GEMMs and fusions follow
our kernels. Gate/up alone: -6 to -8 us at tp=2 in the last call (the -47 of the second was
against a first run), +5 to +10 at tp=1, within the runs' spread. Gate/up alone is the
default: the only setting with no cost beyond the spread at either tp.

Why at all: in that step at tp=2 the boundaries after our kernels left 0.1-0.3 us of idle each,
~1.2-1.7 us per layer, that tp=1 (where XLA's GEMMs, which trigger, sit at those boundaries)
does not have (bench/results/session22_h200x2/README.md).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

ENV = "XLASERVE_EARLY_LAUNCH"
FAMILIES = ("skinny_gemm", "skinny_gemm_swiglu", "rope_write_kv", "ragged_paged_attention")
DEFAULT_FAMILIES = ("skinny_gemm_swiglu",)
PTX = "griddepcontrol.launch_dependents;"


@functools.cache
def _primitive():
    """A side-effecting inline-asm primitive for the Pallas Triton lowering: `pure=False`, so
    Triton keeps it although its result is unused, and a kernel-local effect, so jax keeps it
    in the kernel's jaxpr (jax's own `elementwise_inline_asm` is pure and would be dropped).
    Built on first use: the lowering modules are jax internals that only the GPU path needs."""
    from jax._src import core as jax_core
    from jax._src import effects
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import lowering
    from jax.interpreters.mlir import ir

    class LaunchDependentsEffect(jax_core.Effect):
        pass

    effect = LaunchDependentsEffect()
    pallas_core.kernel_local_effects.add_type(LaunchDependentsEffect)
    effects.control_flow_allowed_effects.add_type(LaunchDependentsEffect)
    prim = jax_core.Primitive("xlaserve_launch_dependents")

    @prim.def_effectful_abstract_eval
    def _abstract():
        return jax_core.ShapedArray((), jnp.int32), {effect}

    @lowering.register_lowering(prim)
    def _lower(ctx):
        del ctx
        # "=r": one scalar i32 result (a plain i32: a rank-0 tensor is not a scalar to Triton's
        # verifier) that the asm leaves unset and nothing reads
        return tt_dialect.elementwise_inline_asm([ir.IntegerType.get_signless(32)], PTX,
                                                 constraints="=r",
                                                 pure=False, packed_element=1, args=[])

    return prim


def launch_dependents() -> None:
    """Lets the kernel's dependents be scheduled once every CTA has passed this point. Call it
    only in compiled kernels where `enabled()` holds."""
    _primitive().bind()


@functools.cache
def unsupported() -> str | None:
    """None when the default device can run the instruction, else why not."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return f"platform {device.platform!r} is not an NVIDIA GPU"
    cc = getattr(device, "compute_capability", None)
    try:
        major = int(str(cc).split(".")[0])
    except ValueError:
        return f"compute capability {cc!r} unknown"
    return None if major >= 9 else f"compute capability {cc} < 9.0 (no griddepcontrol)"


@functools.cache
def _log_once(message: str) -> None:
    log.info("early launch of dependents (PDL): %s", message)


def families() -> tuple[str, ...]:
    """The families that trigger: XLASERVE_EARLY_LAUNCH's ("0" none, "1" all, a comma list) or
    DEFAULT_FAMILIES.

    Raises:
      ValueError: a name in the list that is not a family.
    """
    setting = os.environ.get(ENV, "").strip()
    if not setting:
        return DEFAULT_FAMILIES
    if setting in ("0", "1"):
        return FAMILIES if setting == "1" else ()
    chosen = tuple(f.strip() for f in setting.split(","))
    bad = [f for f in chosen if f not in FAMILIES]
    if bad:
        raise ValueError(f"{ENV}={setting!r}: {bad} not among {FAMILIES} (or 0 / 1)")
    return chosen


def describe() -> str:
    """One line for `xlaserve profile` and logs: which compiled kernels trigger, or why none."""
    why = unsupported()
    if why:
        return f"off: {why}"
    chosen = families()
    source = f"{ENV}={os.environ[ENV]!r}" if os.environ.get(ENV) else "the default"
    return (f"griddepcontrol.launch_dependents at the start of {', '.join(chosen)} ({source})"
            if chosen else f"off ({source})")


def enabled(interpret: bool, family: str) -> bool:
    """Whether a kernel of `family` traced now emits `launch_dependents()` (see the module
    docstring)."""
    if family not in FAMILIES:
        raise ValueError(f"pdl family={family!r}: must be one of {FAMILIES}")
    if interpret:
        return False
    chosen = families()  # a bad XLASERVE_EARLY_LAUNCH raises on any platform
    _log_once(describe())
    return unsupported() is None and family in chosen
