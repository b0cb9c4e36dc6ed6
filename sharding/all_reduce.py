"""A one-shot all-reduce for small messages between the GPUs of one process (tp decode steps).

Why it exists: at tensor_parallel_size > 1, XLA ends a CUDA graph at every collective, so the
8B decode step ran as 66 graphs per device, and each device's executor thread spent more host
time launching and updating them than the GPU spent computing (BENCHMARKS.md, sessions 4-6).
This all-reduce is an ordinary kernel launch (jaxlib's ``triton_kernel_call_ffi`` custom call,
which XLA captures in its command buffers), so a decode step with it has no XLA collective
between its layers.

What it computes: out = sum over ranks r = 0 .. tp-1 of x_r, each element summed in float32 in
rank order (so every rank gets the same bits) and rounded once to x's dtype. For two ranks that
is what NCCL's bf16 sum gives.

How (one launch per all-reduce; CTAs of 256 threads, each CTA owns an 8 KiB chunk, each thread
two 16-byte vectors), NCCL's "LL" idea:
  1. every rank writes its chunk into each peer's workspace (NVLink stores into peer memory; the
     devices of one process have peer access, `enable_peer_access`), every 4 bytes of data
     beside a 4-byte flag holding this call's sequence number, so each 8-byte store arrives
     whole with its flag and no fence or separate signal is needed,
  2. then every rank polls its own workspace until each peer's lines carry the sequence number,
     and sums in rank order (its own vector from x) into out.
Sequence numbers count each CTA's calls (a counter per CTA in the workspace); the data
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
collective), a multiple of 16 bytes, dtypes bfloat16, float16, float32; tp <= 8; the devices of
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

log = logging.getLogger(__name__)

THREADS = 256  # per CTA (8 warps)
CHUNK_BYTES = 8192  # payload per CTA and rank: 2 16-byte vectors per thread
LL_CHUNK_BYTES = 2 * CHUNK_BYTES  # in the workspace: every 4 payload bytes carry a 4-byte flag
MAX_CTAS = 128
MAX_RANKS = 8
MAX_MESSAGE_BYTES = MAX_CTAS * CHUNK_BYTES  # 1 MiB
COUNTER_OFFSET = 0  # u32 per CTA
DATA_OFFSET = 4096
TIMEOUT_NS = 10_000_000_000
FFI_TARGET = "triton_kernel_call_ffi"
MIN_JAX = (0, 11)  # measured on 0.11.2 (2 x H200); 0.10.2's launcher was not tried
_DTYPES = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


def workspace_bytes(tp: int) -> int:
    """Bytes of one device's workspace at this tp."""
    return DATA_OFFSET + MAX_CTAS * 2 * tp * LL_CHUNK_BYTES


def fits(shape: tuple[int, ...], dtype: Any) -> bool:
    """True when a message of this shape and dtype can use the kernel (size, alignment, dtype)."""
    dt = jnp.dtype(dtype)
    nbytes = int(np.prod(shape)) * dt.itemsize
    return dt.name in _DTYPES and 0 < nbytes <= MAX_MESSAGE_BYTES and nbytes % 16 == 0


# ----------------------------------------------------------------------------- the kernel (PTX)

def _accumulate(dtype: str, words: list[str], first: bool) -> list[str]:
    """PTX adding one 16-byte vector (4 b32 registers) into the float32 accumulators %acc*."""
    op = "mov.f32 {a}, {v};" if first else "add.f32 {a}, {a}, {v};"
    lines = []
    if dtype == "f32":
        for k, w in enumerate(words):
            lines += [f"mov.b32 %fv, {w};", op.format(a=f"%acc{k}", v="%fv")]
        return lines
    for k, w in enumerate(words):
        lo, hi = f"%acc{2 * k}", f"%acc{2 * k + 1}"
        if dtype == "bf16":  # bf16 -> f32 is a 16-bit shift
            lines += [f"shl.b32 %u, {w}, 16;", "mov.b32 %fv, %u;", op.format(a=lo, v="%fv"),
                      f"and.b32 %u, {w}, 0xFFFF0000;", "mov.b32 %fv, %u;",
                      op.format(a=hi, v="%fv")]
        else:
            lines += [f"mov.b32 {{%h0, %h1}}, {w};", "cvt.f32.f16 %fv, %h0;",
                      op.format(a=lo, v="%fv"), "cvt.f32.f16 %fv, %h1;", op.format(a=hi, v="%fv")]
    return lines


def _pack(dtype: str) -> list[str]:
    """PTX rounding the accumulators into %w0..%w3 (the output vector)."""
    if dtype == "f32":
        return [f"mov.b32 %w{k}, %acc{k};" for k in range(4)]
    cvt = "cvt.rn.bf16x2.f32" if dtype == "bf16" else "cvt.rn.f16x2.f32"
    return [f"{cvt} %w{k}, %acc{2 * k + 1}, %acc{2 * k};" for k in range(4)]  # hi, lo


def kernel_name(tp: int, dtype: Any) -> str:
    return f"xlaserve_all_reduce_tp{tp}_{_DTYPES[jnp.dtype(dtype).name]}"


def all_reduce_ptx(tp: int, dtype: Any, arch: int) -> str:
    """The PTX of the kernel for `tp` ranks and `dtype` on compute capability `arch` (e.g. 90).

    Parameters, in order: x, rank (i32[1]), out (buffers); the tp workspace addresses (u64);
    nvec, the message's 16-byte vectors (u32). Pointers a jaxlib appends after them (0.11's
    launcher adds global-scratch and profiling pointers) are not declared: the driver reads only
    the declared parameters.
    """
    if not 2 <= tp <= MAX_RANKS:
        raise ValueError(f"tp={tp}: the custom all-reduce supports 2..{MAX_RANKS} ranks")
    dt = _DTYPES[jnp.dtype(dtype).name]
    name = kernel_name(tp, dtype)
    chunk_vec = CHUNK_BYTES // 16
    nacc = 4 if dt == "f32" else 8
    vec = "{%w0, %w1, %w2, %w3}"
    ws_params = ",\n".join(f"    .param .u64 p_ws{r}" for r in range(tp))
    body: list[str] = []
    emit = body.append
    emit(".reg .pred %p, %is0, %peq<8>, %pne<8>;")
    emit(".reg .b32 %th, %nthr, %cta, %rank, %seq, %slot, %nvec, %vbeg, %vend, %v, %blk, %t, "
         "%u, %w0, %w1, %w2, %w3, %q0, %q1, %q2, %q3, %f0, %f1, %f2, %f3;")
    emit(".reg .b16 %h0, %h1;")
    emit(".reg .b64 %xp, %rankp, %outp, %wsl, %cnt, %a, %b, %off, %loc, %start, %now;")
    emit(f".reg .b64 %ws<{tp}>;")
    emit(f".reg .f32 %fv, %acc<{nacc}>;")
    for name_, reg in (("p_x", "%xp"), ("p_rank", "%rankp"), ("p_out", "%outp")):
        emit(f"ld.param.u64 {reg}, [{name_}];")
        emit(f"cvta.to.global.u64 {reg}, {reg};")
    for r in range(tp):
        emit(f"ld.param.u64 %ws{r}, [p_ws{r}];")
    emit("ld.param.u32 %nvec, [p_nvec];")
    emit("mov.u32 %th, %tid.x;")
    emit("mov.u32 %nthr, %ntid.x;")
    emit("mov.u32 %cta, %ctaid.x;")
    emit("ld.global.nc.u32 %rank, [%rankp];")
    emit("mov.u64 %wsl, %ws0;")
    for r in range(tp):
        emit(f"setp.eq.u32 %peq{r}, %rank, {r};")
        emit(f"setp.ne.u32 %pne{r}, %rank, {r};")
        if r:
            emit(f"selp.b64 %wsl, %ws{r}, %wsl, %peq{r};")
    # This CTA's call counter -> sequence number (the flag value of this call), shared.
    emit("setp.eq.u32 %is0, %th, 0;")
    emit("mul.wide.u32 %off, %cta, 4;")
    emit(f"add.u64 %cnt, %wsl, {COUNTER_OFFSET};")
    emit("add.u64 %cnt, %cnt, %off;")
    emit("@!%is0 bra SEQ_DONE;")
    emit("ld.global.cg.u32 %seq, [%cnt];")
    emit("add.u32 %seq, %seq, 1;")
    emit(f"st.shared.u32 [{name}_seq], %seq;")
    emit("SEQ_DONE:")
    emit("bar.sync 0;")
    emit(f"ld.shared.u32 %seq, [{name}_seq];")
    emit("and.b32 %slot, %seq, 1;")
    emit(f"mul.lo.u32 %vbeg, %cta, {chunk_vec};")
    emit(f"add.u32 %vend, %vbeg, {chunk_vec};")
    emit("min.u32 %vend, %vend, %nvec;")
    emit("mad.lo.u32 %t, %cta, 2, %slot;")
    emit(f"mul.lo.u32 %blk, %t, {tp};")  # LL block of (cta, slot, source 0)
    # 1. push: each 16-byte vector of x goes to every peer as two 16-byte LL lines
    #    {d0, seq, d1, seq}, {d2, seq, d3, seq}: every 8-byte half carries its own flag, so the
    #    reader needs no fence (8-byte stores arrive whole).
    emit("add.u32 %v, %vbeg, %th;")
    emit("PUSH_LOOP:")
    emit("setp.ge.u32 %p, %v, %vend;")
    emit("@%p bra PUSH_DONE;")
    emit("mul.wide.u32 %off, %v, 16;")
    emit("add.u64 %a, %xp, %off;")
    emit(f"ld.global.v4.b32 {vec}, [%a];")
    emit("sub.u32 %t, %v, %vbeg;")
    emit("mul.wide.u32 %loc, %t, 32;")
    emit("add.u32 %t, %blk, %rank;")
    emit(f"mul.wide.u32 %b, %t, {LL_CHUNK_BYTES};")
    emit("add.u64 %b, %b, %loc;")
    emit(f"add.u64 %b, %b, {DATA_OFFSET};")
    for r in range(tp):
        emit(f"add.u64 %a, %ws{r}, %b;")
        emit(f"@%pne{r} st.volatile.global.v4.b32 [%a], {{%w0, %seq, %w1, %seq}};")
        emit(f"@%pne{r} st.volatile.global.v4.b32 [%a+16], {{%w2, %seq, %w3, %seq}};")
    emit("add.u32 %v, %v, %nthr;")
    emit("bra PUSH_LOOP;")
    emit("PUSH_DONE:")
    # 2. sum in rank order: own vector from x, each peer's from this workspace once both of
    #    its LL lines carry this call's flag (volatile loads: never a stale L1 line).
    emit("add.u32 %v, %vbeg, %th;")
    emit("RED_LOOP:")
    emit("setp.ge.u32 %p, %v, %vend;")
    emit("@%p bra RED_DONE;")
    emit("mul.wide.u32 %off, %v, 16;")
    emit("sub.u32 %t, %v, %vbeg;")
    emit("mul.wide.u32 %loc, %t, 32;")
    emit("add.u64 %a, %xp, %off;")
    emit(f"ld.global.v4.b32 {vec}, [%a];")
    for r in range(tp):
        emit(f"@%peq{r} bra OWN{r};")
        emit(f"add.u32 %t, %blk, {r};")
        emit(f"mul.wide.u32 %b, %t, {LL_CHUNK_BYTES};")
        emit("add.u64 %b, %b, %loc;")
        emit(f"add.u64 %b, %b, {DATA_OFFSET};")
        emit("add.u64 %b, %wsl, %b;")
        emit("mov.u64 %start, %globaltimer;")
        emit(f"SPIN{r}:")
        emit("ld.volatile.global.v4.b32 {%q0, %f0, %q1, %f1}, [%b];")
        emit("ld.volatile.global.v4.b32 {%q2, %f2, %q3, %f3}, [%b+16];")
        emit("setp.eq.u32 %p, %f0, %seq;")
        for f in ("%f1", "%f2", "%f3"):
            emit(f"setp.eq.and.u32 %p, {f}, %seq, %p;")
        emit(f"@%p bra GOT{r};")
        emit("mov.u64 %now, %globaltimer;")
        emit("sub.u64 %now, %now, %start;")
        emit(f"setp.gt.u64 %p, %now, {TIMEOUT_NS};")
        emit("@%p trap;")
        emit(f"bra SPIN{r};")
        emit(f"OWN{r}:")
        for k in range(4):
            emit(f"mov.b32 %q{k}, %w{k};")
        emit(f"GOT{r}:")
        body.extend(_accumulate(dt, ["%q0", "%q1", "%q2", "%q3"], first=(r == 0)))
    body.extend(_pack(dt))
    emit("add.u64 %a, %outp, %off;")
    emit(f"st.global.v4.b32 [%a], {vec};")
    emit("add.u32 %v, %v, %nthr;")
    emit("bra RED_LOOP;")
    emit("RED_DONE:")
    emit("@%is0 st.global.u32 [%cnt], %seq;")
    emit("ret;")
    lines = "\n".join("    " + b if not b.endswith(":") else b for b in body)
    return (f"//\n// xlaserve one-shot all-reduce, tp={tp}, {dt}\n//\n"
            f".version 7.8\n.target sm_{arch}\n.address_size 64\n\n"
            f".shared .align 4 .u32 {name}_seq;\n\n"
            f".visible .entry {name}(\n"
            f"    .param .u64 p_x,\n    .param .u64 p_rank,\n    .param .u64 p_out,\n"
            f"{ws_params},\n    .param .u32 p_nvec\n)\n"
            f".maxntid {THREADS}, 1, 1\n{{\n{lines}\n}}\n")


# ----------------------------------------------------------------------------- device set-up

def _gpu_triton() -> Any:
    """jaxlib's Triton kernel-call module, or None when this jaxlib has none (CPU builds)."""
    try:
        from jax._src.lib import gpu_triton
    except ImportError:
        return None
    return gpu_triton if hasattr(gpu_triton, "TritonKernelCall") else None


def enable_peer_access(devices: list[jax.Device]) -> None:
    """Enables CUDA peer access between every pair of `devices` (their primary contexts).

    Raises:
      RuntimeError: the driver refuses (e.g. no NVLink/PCIe P2P path), naming the pair.
    """
    cuda = ctypes.CDLL("libcuda.so.1")
    already_enabled = 704  # CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
    ords = [int(d.local_hardware_id) for d in devices]  # type: ignore[attr-defined]
    ctxs: dict[int, ctypes.c_void_p] = {}
    try:
        for o in ords:
            ctx = ctypes.c_void_p()
            rc = cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), o)
            if rc:
                raise RuntimeError(f"cuDevicePrimaryCtxRetain(device {o}) failed: CUDA error "
                                   f"{rc}")
            ctxs[o] = ctx
        for a in ords:
            for b in ords:
                if a == b:
                    continue
                can = ctypes.c_int(0)
                rc = cuda.cuDeviceCanAccessPeer(ctypes.byref(can), a, b)
                if rc or not can.value:
                    raise RuntimeError(f"device {a} cannot access device {b}'s memory (no P2P; "
                                       f"CUDA error {rc})")
                rc = cuda.cuCtxPushCurrent_v2(ctxs[a])
                if rc:
                    raise RuntimeError(f"cuCtxPushCurrent(device {a}) failed: CUDA error {rc}")
                rc = cuda.cuCtxEnablePeerAccess(ctxs[b], 0)
                cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
                if rc not in (0, already_enabled):
                    raise RuntimeError(f"cuCtxEnablePeerAccess({a} -> {b}) failed: CUDA "
                                       f"error {rc}")
                log.info("peer access %d -> %d: %s", a, b,
                         "enabled" if rc == 0 else "already enabled")
    finally:
        for o in ctxs:
            cuda.cuDevicePrimaryCtxRelease_v2(o)


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
    arch = (int(gt.get_compute_capability(int(devices[0].local_hardware_id)))  # type: ignore
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
        log.info("custom all-reduce: tp=%d, %d KiB workspace per device, messages up to %d KiB",
                 tp, workspace_bytes(tp) >> 10, MAX_MESSAGE_BYTES >> 10)
        return cls(tp, addresses, arch, model_axis, ws)

    def _opaque(self, nbytes: int, dtype: Any) -> tuple[str, bytes]:
        gt = _gpu_triton()
        name = kernel_name(self.tp, dtype)
        kernel = gt.TritonKernel(name, THREADS // 32, 1, 0,
                                 all_reduce_ptx(self.tp, dtype, self.arch), "", self.arch)
        nvec = nbytes // 16
        params = [gt.create_array_parameter(0, 16), gt.create_array_parameter(0, 4),
                  gt.create_array_parameter(0, 16)]
        params += [gt.create_scalar_parameter(a, "u64") for a in self.addresses]
        params.append(gt.create_scalar_parameter(nvec, "u32"))
        grid = -(-nvec // (CHUNK_BYTES // 16))
        call = gt.TritonKernelCall(kernel, grid, 1, 1, params)
        return name, zlib.compress(call.to_proto(name, b""))

    def __call__(self, x: jax.Array) -> jax.Array:
        """The sum of x over the ``model`` axis; call inside shard_map (x is this rank's part).

        Raises:
          ValueError: x does not `fit` the kernel (shape, dtype named).
        """
        if not fits(x.shape, x.dtype):
            raise ValueError(f"custom all-reduce: x {x.shape} {x.dtype} does not fit (dtypes "
                             f"{sorted(_DTYPES)}, up to {MAX_MESSAGE_BYTES} bytes, a multiple "
                             f"of 16)")
        nbytes = int(np.prod(x.shape)) * x.dtype.itemsize
        name, opaque = self._opaque(nbytes, x.dtype)
        rank = jax.lax.axis_index(self.model_axis).astype(jnp.int32).reshape(1)
        call = jax.ffi.ffi_call(FFI_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype))
        return call(x, rank, name=name, opaque=opaque)
