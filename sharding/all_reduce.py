"""A one-shot all-reduce for small messages between the GPUs of one process (tp decode steps).

Why it exists: at tensor_parallel_size > 1, XLA ends a CUDA graph at every collective, so the
8B decode step ran as 66 graphs per device, and each device's executor thread spent more host
time launching and updating them than the GPU spent computing (BENCHMARKS.md, sessions 4-6).
This all-reduce is an ordinary kernel launch (jaxlib's ``triton_kernel_call_ffi`` custom call,
which XLA captures in its command buffers), so a decode step with it has no XLA collective
between its layers.

What it computes: out = sum over ranks r = 0 .. tp-1 of x_r, each element summed in float32 in
rank order (so every rank gets the same bits) and rounded once to x's dtype. For two ranks that
is what NCCL's bf16 sum gives. `AllReduce.add_rms_norm` is the same sum fused with what follows
it in a pre-norm decoder (session 10): residual + sum, and its RMSNorm times a scale, one CTA
per token row, saving the separate add + norm kernel after each of the model's all-reduces.
The PTX of both is generated in sharding/all_reduce_ptx.py.

How (one launch per all-reduce; CTAs of 256 threads, each CTA owns an 8 KiB chunk, each thread
two 16-byte vectors; the fused kernel: one CTA per token row of up to 8 KiB), NCCL's "LL" idea:
  1. every rank writes its chunk into each peer's workspace (NVLink stores into peer memory; the
     devices of one process have peer access, `enable_peer_access`), every 4 bytes of data
     beside a 4-byte flag holding this call's sequence number, so each 8-byte store arrives
     whole with its flag and no fence or separate signal is needed,
  2. then every rank polls its own workspace until each peer's lines carry the sequence number,
     and sums in rank order (its own vector from x) into out.
Sequence numbers count each CTA's calls (a counter per CTA in the workspace, which every thread
reads as soon as it knows its rank). The rank comes from the kernel's output pointer: the
AllReduce knows each device's allocation range (cuMemGetAddressRange of its workspace), so the
rank needs no load unless a buffer lies outside them (then the rank buffer is read; a warning at
start-up says so). Session 27 measured it against the rank loaded first and then the counter
(two dependent loads and a barrier before the first NVLink store): 3.82 us per fused call on the
GPU that does not wait against 4.25-4.4, the tp=2 step ~10 us shorter. (Loading every rank's
counter before the rank was known, by cp.async or an L2 prefetch, made the step 10-60 us slower:
session 25, commit 83db79b.) The data
alternates between two slots by the number's parity: a rank reuses a slot only after its peer
has finished the next call, which needs the peer to have read the slot first. A wait that lasts
10 s traps (a device error that fails the step) instead of hanging.

Workspace of each device (bytes): counters [128 CTAs] u32 at 0, LL data
[128 CTAs][2 slots][tp sources][16 KiB] at 4096 (8 MiB at tp 2). It is a jax.Array the caller
keeps alive; its device addresses are compile-time constants of the programs that use it (part
of the HLO, so a persistent-cache hit only happens when the addresses are the same). Calls in
one program must be ordered by data dependence (a chain, as the model's are): two independent
calls could run at once and share the counters.

Limits: messages up to 128 x 8 KiB = 1 MiB per rank (decode steps; larger ones use XLA's
collective), a multiple of 16 bytes, dtypes bfloat16, float16, float32 (the fused kernel: up to
128 rows of up to 8 KiB, e.g. hidden 4096 in bf16); tp <= 8; the devices of
one process (no multi-host); jax 0.11+ (measured on 0.11.2). Needs the CUDA plugin's Triton
kernel-call support (jaxlib's `gpu_triton`) and peer access; `availability` says why not
otherwise.

Failure and limits (review, session 9): a 10 s wait traps, which is a sticky CUDA error: those
GPUs are unusable for the rest of the process (steps fail loudly; restart the server). The LL
protocol assumes 8-byte halves of a 16-byte vector store arrive whole, as NCCL's LL does (PTX only
promises 4-byte words; 64-bit {data, flag} stores would make it explicit: not yet measured).
Flags are u32: after 2^32 calls of one CTA (days of nonstop decode) a line not rewritten since
could match again; not handled yet.

Reference: ``jax.lax.psum`` (tests compare the two on the GPU).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xlaserve.runtime import hardware
from xlaserve.sharding.all_reduce_ptx import (
    CHUNK_BYTES,
    DATA_OFFSET,
    DTYPES,
    LL_CHUNK_BYTES,
    MAX_CTAS,
    MAX_RANKS,
    THREADS,
    add_rms_norm_kernel_name,
    add_rms_norm_ptx,
    add_rms_norm_row_ok,
    all_reduce_ptx,
    kernel_name,
)

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = MAX_CTAS * CHUNK_BYTES  # 1 MiB
FFI_TARGET = "triton_kernel_call_ffi"
# "range" (default, session 27): the kernels take their rank from their output pointer
# (AllReduce.ranges); "load": from the rank buffer (the A/B of bench/run_gpu_s27.sh)
RANK_ENV = "XLASERVE_ALL_REDUCE_RANK"
MIN_JAX = (0, 11)  # measured on 0.11.2 (2 x H200); 0.10.2's launcher was not tried


def workspace_bytes(tp: int) -> int:
    """Bytes of one device's workspace at this tp."""
    return DATA_OFFSET + MAX_CTAS * 2 * tp * LL_CHUNK_BYTES


def fits(shape: tuple[int, ...], dtype: Any) -> bool:
    """True when a message of this shape and dtype can use the kernel (size, alignment, dtype)."""
    dt = jnp.dtype(dtype)
    nbytes = int(np.prod(shape)) * dt.itemsize
    return dt.name in DTYPES and 0 < nbytes <= MAX_MESSAGE_BYTES and nbytes % 16 == 0


def fits_add_rms_norm(shape: tuple[int, ...], dtype: Any) -> bool:
    """True when x [T, D] can use the fused all-reduce + residual add + RMSNorm kernel: one CTA
    per row (T <= 128), a row of at most 8 KiB (D <= 4096 in bf16) and a multiple of 16 bytes."""
    return (len(shape) == 2 and 0 < shape[0] <= MAX_CTAS and jnp.dtype(dtype).name in DTYPES
            and add_rms_norm_row_ok(shape[1], dtype))


# ----------------------------------------------------------------------------- device set-up

def _gpu_triton() -> Any:
    """jaxlib's Triton kernel-call module, or None when this jaxlib has none (CPU builds)."""
    try:
        # jaxlib's Triton launcher has no public jax API
        from jax._src.lib import gpu_triton  # pyright: ignore[reportPrivateImportUsage]
    except ImportError:
        return None
    return gpu_triton if hasattr(gpu_triton, "TritonKernelCall") else None


# (jax.Device is jaxlib's compiled class, which has no stub: pyright takes it for a variable)
def enable_peer_access(devices: list[jax.Device]) -> None:  # pyright: ignore[reportInvalidTypeForm]
    """Enables CUDA peer access between every pair of `devices` (their primary contexts).

    Raises:
      RuntimeError: the driver refuses (e.g. no NVLink/PCIe P2P path), naming the pair.
    """
    already_enabled = 704  # CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
    ords = [int(d.local_hardware_id) for d in devices]
    with hardware.primary_contexts(ords) as (cuda, ctxs):
        for a in ords:
            for b in ords:
                if a == b:
                    continue
                can = ctypes.c_int(0)
                rc = cuda.cuDeviceCanAccessPeer(ctypes.byref(can), a, b)
                if rc or not can.value:
                    raise RuntimeError(f"device {a} cannot access device {b}'s memory (no P2P; "
                                       f"CUDA error {rc})")
                with hardware.pushed(cuda, ctxs[a], a):
                    rc = cuda.cuCtxEnablePeerAccess(ctxs[b], 0)
                if rc not in (0, already_enabled):
                    raise RuntimeError(f"cuCtxEnablePeerAccess({a} -> {b}) failed: CUDA "
                                       f"error {rc}")
                log.info("peer access %d -> %d: %s", a, b,
                         "enabled" if rc == 0 else "already enabled")


def allocation_ranges(devices: list[jax.Device],  # pyright: ignore[reportInvalidTypeForm]
                      addresses: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(start, end) of the device allocation (cuMemGetAddressRange) holding each address, the
    i-th on devices[i].

    Raises:
      RuntimeError: the driver call fails, naming the device and address.
    """
    ords = [int(d.local_hardware_id) for d in devices]
    out = []
    with hardware.primary_contexts(ords) as (cuda, ctxs):
        for o, addr in zip(ords, addresses):
            base, size = ctypes.c_uint64(), ctypes.c_size_t()
            with hardware.pushed(cuda, ctxs[o], o):
                rc = cuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size),
                                                  ctypes.c_uint64(addr))
            if rc:
                raise RuntimeError(f"cuMemGetAddressRange({addr:#x}) on device {o} failed: "
                                   f"CUDA error {rc}")
            out.append((int(base.value), int(base.value) + int(size.value)))
    return tuple(out)


def availability(mesh: Mesh, model_axis: str = "model") -> str | None:
    """None when the kernel can run on this mesh, else the reason it cannot."""
    tp = mesh.shape[model_axis]
    devices = list(mesh.devices.flat)
    if tp < 2:
        return "tensor_parallel_size < 2 (nothing to reduce)"
    if tp > MAX_RANKS:
        return f"tensor_parallel_size={tp} > {MAX_RANKS}"
    if len(devices) != tp:
        return "the mesh has a data axis > 1 (the kernel runs on 1 x tp meshes)"
    if any(d.platform != "gpu" for d in devices):
        return f"platform {devices[0].platform} (the kernel is for NVIDIA GPUs)"
    if any(d.process_index != jax.process_index() for d in devices):
        return "the mesh spans processes (the kernel needs the devices of one process)"
    gt = _gpu_triton()
    arch = (int(gt.get_compute_capability(int(devices[0].local_hardware_id)))
            if gt is not None else None)
    return support_reason(tuple(int(p) for p in jax.__version_info__[:2]), arch,
                          os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", ""))


def support_reason(jax_version: tuple[int, ...], arch: int | None, allocator: str) -> str | None:
    """Why this jax / GPU / allocator cannot run the kernel (None: it can).

    Args:
      jax_version: (major, minor).
      arch: compute capability (e.g. 90), None when jaxlib has no Triton kernel-call support.
      allocator: XLA_PYTHON_CLIENT_ALLOCATOR. Peer access (cuCtxEnablePeerAccess) covers the
        default allocator's cuMemAlloc memory, not stream-ordered pools ("cuda_async").
    """
    if arch is None:
        return "this jaxlib has no Triton kernel-call support (jax._src.lib.gpu_triton)"
    if tuple(jax_version) < MIN_JAX:
        return (f"jax {'.'.join(map(str, jax_version))}: the kernel's launch path was measured "
                f"with jax {'.'.join(map(str, MIN_JAX))}+ only")
    if arch < 80:
        return f"compute capability {arch / 10:.1f} (the kernel's bf16/f16 conversions need 8.0+)"
    if allocator == "cuda_async":
        return ("XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async (peer access does not cover its memory "
                "pools)")
    return None


@dataclasses.dataclass(frozen=True)
class AllReduce:
    """The kernel bound to one mesh's workspaces: call it inside shard_map over ``model``.

    Frozen and hashable (a static part of the jitted step). `workspace` is held only to keep
    the device memory alive; equality and hashing use the addresses.
    """

    tp: int
    addresses: tuple[int, ...]  # workspace address of each rank, in model-axis order
    arch: int  # compute capability, e.g. 90
    model_axis: str = "model"
    workspace: Any = dataclasses.field(default=None, compare=False, repr=False)
    # (start, end) of the device allocation holding each rank's workspace, in rank order: the
    # kernels find their rank from their output pointer without a load when it lies in one
    # (`all_reduce_ptx._rank_and_sequence`); None: they load the rank buffer.
    ranges: tuple[tuple[int, int], ...] | None = None

    @classmethod
    def create(cls, mesh: Mesh, model_axis: str = "model") -> AllReduce:
        """Allocates the workspaces on `mesh` and enables peer access between its devices.

        Raises:
          RuntimeError: `availability` gives a reason, or peer access cannot be enabled.
        """
        why = availability(mesh, model_axis)
        if why is not None:
            raise RuntimeError(f"custom all-reduce unavailable: {why}")
        tp = mesh.shape[model_axis]
        devices = list(mesh.devices.flat)
        enable_peer_access(devices)
        words = workspace_bytes(tp) // 4
        sharding = NamedSharding(mesh, PartitionSpec(model_axis))
        ws = jax.jit(lambda: jnp.zeros((tp, words), jnp.int32), out_shardings=sharding)()
        # Every device's zeros must have landed before any program can push into a peer's
        # workspace (a late fill would wipe a peer's first message).
        jax.block_until_ready(ws)
        by_rank = sorted(ws.addressable_shards, key=lambda s: s.index[0].start)
        addresses = tuple(int(s.data.unsafe_buffer_pointer()) for s in by_rank)
        arch = int(_gpu_triton().get_compute_capability(int(devices[0].local_hardware_id)))
        ranges = None
        if os.environ.get(RANK_ENV, "range") == "range":
            rank_devices = [s.device for s in by_rank]
            ranges = allocation_ranges(rank_devices, addresses)
            probe = [int(jax.device_put(jnp.zeros(4), d).unsafe_buffer_pointer())
                     for d in rank_devices]
            inside = [start <= p < end for p, (start, end) in zip(probe, ranges)]
            log.log(logging.INFO if all(inside) else logging.WARNING,
                    "custom all-reduce: rank from the output pointer (%s=range): device "
                    "allocations %s; a new array lies in its device's: %s%s", RANK_ENV,
                    [f"{a:#x}+{(b - a) >> 20} MiB" for a, b in ranges], inside,
                    "" if all(inside) else " (buffers outside them load the rank: correct, "
                    "~10 us slower per 8B step)")
        log.info("custom all-reduce: tp=%d, %d KiB workspace per device, messages up to %d KiB",
                 tp, workspace_bytes(tp) >> 10, MAX_MESSAGE_BYTES >> 10)
        return cls(tp, addresses, arch, model_axis, ws, ranges)

    def _opaque(self, name: str, ptx: str, buffers: tuple[int, ...], grid: int,
                scalars: tuple[tuple[int, str], ...] = ()) -> bytes:
        """The launch record jaxlib's kernel-call handler reads: one pointer parameter per
        entry of `buffers` (the call's operands, then its results; each entry the alignment in
        bytes jaxlib checks at launch), the workspace addresses, then `scalars`."""
        gt = _gpu_triton()
        kernel = gt.TritonKernel(name, THREADS // 32, 1, 0, ptx, "", self.arch)
        params = [gt.create_array_parameter(0, align) for align in buffers]
        params += [gt.create_scalar_parameter(a, "u64") for a in self.addresses]
        params += [gt.create_scalar_parameter(v, t) for v, t in scalars]
        call = gt.TritonKernelCall(kernel, grid, 1, 1, params)
        return zlib.compress(call.to_proto(name, b""))

    def describe(self) -> str:
        """How the kernels find their rank."""
        return ("its rank from its output pointer (each device's allocation range)"
                if self.ranges else f"its rank loaded from memory ({RANK_ENV}=load)")

    def _rank(self) -> jax.Array:
        return jax.lax.axis_index(self.model_axis).astype(jnp.int32).reshape(1)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The sum of x over the ``model`` axis; call inside shard_map (x is this rank's part).

        Raises:
          ValueError: x does not `fit` the kernel (shape, dtype named).
        """
        if not fits(x.shape, x.dtype):
            raise ValueError(f"custom all-reduce: x {x.shape} {x.dtype} does not fit (dtypes "
                             f"{sorted(DTYPES)}, up to {MAX_MESSAGE_BYTES} bytes, a multiple "
                             f"of 16)")
        nvec = int(np.prod(x.shape)) * x.dtype.itemsize // 16
        name = kernel_name(self.tp, x.dtype, self.ranges)
        opaque = self._opaque(name, all_reduce_ptx(self.tp, x.dtype, self.arch, self.ranges),
                              (16, 4, 16),
                              -(-nvec // (CHUNK_BYTES // 16)), ((nvec, "u32"),))
        call = jax.ffi.ffi_call(FFI_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype))
        return call(x, self._rank(), name=name, opaque=opaque)

    def add_rms_norm(self, x: jax.Array, residual: jax.Array, scale: jax.Array,
                     eps: float, rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(residual + sum of x over ``model``, its RMSNorm times `scale`), in one kernel; call
        inside shard_map (x [T, D] is this rank's partial sum; residual [T, D] and scale [D]
        are the same on every rank). Equals `layers.rms_norm(residual + psum(x))` up to the
        norm's float32 arithmetic (the squares summed in another order with fma, rsqrt.approx):
        the residual is bit-equal at tp 2, the normed output within a 16-bit ulp or two.

        x may also be float32 [S, T, D]: S split-K partial products whose sum is this rank's
        part (the kernel sums them in order and rounds to residual's dtype before the exchange;
        `ShardedRowParallel.split_k`).

        rows: i32[1], how many leading rows carry tokens (the same on every rank; default all
        T). The others are padding: both outputs are zero there and they are not exchanged.

        Raises:
          ValueError: x does not `fits_add_rms_norm`, or the shapes / dtypes disagree.
        """
        partials = None
        if x.ndim == 3 and x.dtype == jnp.float32:  # split-K partials [S, T, D]
            partials = (int(x.shape[0]), int(x.shape[1]))
        t, d = residual.shape if residual.ndim == 2 else (0, 0)
        want_x = (partials[0], t, d) if partials else (t, d)
        if (not fits_add_rms_norm(residual.shape, residual.dtype) or x.shape != want_x
                or scale.shape != (d,) or (partials is None and residual.dtype != x.dtype)
                or scale.dtype != residual.dtype):
            raise ValueError(f"custom all-reduce + RMSNorm: x {x.shape} {x.dtype}, residual "
                             f"{residual.shape} {residual.dtype}, scale {scale.shape} "
                             f"{scale.dtype}: needs residual [T <= {MAX_CTAS}, D] with a row of "
                             f"at most {CHUNK_BYTES} bytes, x like residual (or float32 split-K "
                             f"partials [S, T, D]), scale [D], one dtype of {sorted(DTYPES)}")
        dt = residual.dtype
        ptx = add_rms_norm_ptx(self.tp, dt, self.arch, d, eps, partials, self.ranges)
        name = add_rms_norm_kernel_name(self.tp, dt, d, eps, partials, self.ranges)
        if rows is None:
            rows = jnp.full((1,), t, jnp.int32)
        if rows.shape != (1,) or rows.dtype != jnp.int32:
            raise ValueError(f"custom all-reduce + RMSNorm: rows {rows.shape} {rows.dtype} "
                             f"must be i32[1]")
        opaque = self._opaque(name, ptx, (16, 4, 4, 16, 16, 16, 16), t)
        out = jax.ShapeDtypeStruct(residual.shape, dt)
        call = jax.ffi.ffi_call(FFI_TARGET, (out, out))
        summed, normed = call(x, self._rank(), rows, residual, scale, name=name, opaque=opaque)
        return summed, normed
