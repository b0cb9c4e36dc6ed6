"""Peak compute and memory rates of the devices xlaserve runs on, for roofline estimates.

Two sources:
  * `PEAKS`: a table of datasheet numbers per GPU model (dense, no structured sparsity), looked up
    by the exact ``device_kind`` string that jax reports (`peaks_for_device`), or by table name.
  * `calibrate`: measures copy bandwidth and matmul rate on the current device. Use it for devices
    not in the table and to see how far the datasheet is from what this machine delivers.

Float32 matmul rates for GPUs are the TF32 tensor-core rates, because XLA's default matmul
precision on Ampere and newer runs float32 dots on TF32 tensor cores.

The "cpu-nominal" entry is a documented round number (100 GFLOP/s, 20 GB/s), not a measurement:
it only lets the CPU test path compute a roofline. Pass ``--calibrate`` for a measured one.

This module does no profiling of its own and never guesses: an unknown device raises.
`cuda_memory_info` asks the CUDA driver for a GPU's free and total memory (for sizing the KV
cache when XLA's allocator reports no limit). `primary_contexts` / `pushed` are the driver
calls both it and the all-reduce's peer set-up (sharding/all_reduce.enable_peer_access) make in
the devices' primary contexts, the ones XLA uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jax

# `jax.Device` annotations below carry `# pyright: ignore[reportInvalidTypeForm]`: jax exports
# Device as a plain assignment of jaxlib's untyped extension class, which pyright reads as a
# variable; there is no typed public equivalent.

_TERA = 1e12
_GIGA = 1e9


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    """Peak rates of one device (one chip, one process's view of it)."""

    name: str  # table key or "calibrated:<device_kind>"
    bf16_flops_per_s: float  # dense bf16/fp16 matmul rate
    fp32_flops_per_s: float  # dense float32 matmul rate (TF32 tensor cores on GPUs)
    memory_bytes_per_s: float  # main memory (HBM / DRAM) bandwidth
    memory_capacity_bytes: int | None  # device memory, None when not meaningful (CPU)
    source: str  # "datasheet", "nominal" or "measured"
    device_kinds: tuple[str, ...] = ()  # jax device_kind strings this entry matches exactly

    def __post_init__(self) -> None:
        for name in ("bf16_flops_per_s", "fp32_flops_per_s", "memory_bytes_per_s"):
            v = getattr(self, name)
            if not v > 0:
                raise ValueError(f"{name}={v!r}: must be > 0")
        if self.source not in ("datasheet", "nominal", "measured"):
            raise ValueError(f"source={self.source!r}: must be datasheet, nominal or measured")

    def flops_per_s(self, dtype: str) -> float:
        """Matmul peak for weights/activations of `dtype` ("bfloat16", "float16", "float32")."""
        if dtype in ("bfloat16", "float16"):
            return self.bf16_flops_per_s
        if dtype == "float32":
            return self.fp32_flops_per_s
        raise ValueError(f"dtype={dtype!r}: must be bfloat16, float16 or float32")

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _gpu(name: str, bf16_tflops: float, tf32_tflops: float, tb_per_s: float, gib: float,
         kinds: tuple[str, ...]) -> DevicePeaks:
    return DevicePeaks(name=name, bf16_flops_per_s=bf16_tflops * _TERA,
                       fp32_flops_per_s=tf32_tflops * _TERA, memory_bytes_per_s=tb_per_s * _TERA,
                       memory_capacity_bytes=int(gib * 2**30), source="datasheet",
                       device_kinds=kinds)


# NVIDIA datasheet numbers, dense (the sparse figures are twice these). Memory in GiB as sold.
PEAKS: dict[str, DevicePeaks] = {p.name: p for p in (
    _gpu("h100-sxm", 989.4, 494.7, 3.35, 80, ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB")),
    _gpu("h100-pcie", 756.0, 378.0, 2.0, 80, ("NVIDIA H100 PCIe",)),
    _gpu("h100-nvl", 835.0, 417.5, 3.9, 94, ("NVIDIA H100 NVL",)),
    _gpu("h200", 989.4, 494.7, 4.8, 141, ("NVIDIA H200", "NVIDIA H200 141GB HBM3e")),
    _gpu("h200-nvl", 835.0, 417.5, 4.8, 141, ("NVIDIA H200 NVL",)),
    _gpu("gh200", 989.4, 494.7, 4.0, 96, ("NVIDIA GH200 480GB",)),
    _gpu("b200", 2250.0, 1100.0, 8.0, 180, ("NVIDIA B200",)),
    _gpu("a100-sxm-80gb", 312.0, 156.0, 2.039, 80, ("NVIDIA A100-SXM4-80GB",)),
    _gpu("a100-sxm-40gb", 312.0, 156.0, 1.555, 40, ("NVIDIA A100-SXM4-40GB",)),
    _gpu("a100-pcie-80gb", 312.0, 156.0, 1.935, 80, ("NVIDIA A100 80GB PCIe",)),
    _gpu("a100-pcie-40gb", 312.0, 156.0, 1.555, 40, ("NVIDIA A100-PCIE-40GB",)),
    _gpu("l40s", 362.05, 183.0, 0.864, 48, ("NVIDIA L40S",)),
    _gpu("l4", 121.0, 60.0, 0.3, 24, ("NVIDIA L4",)),
    # Not a datasheet: a round number so that CPU runs (CI) get a roofline at all.
    DevicePeaks(name="cpu-nominal", bf16_flops_per_s=100 * _GIGA, fp32_flops_per_s=100 * _GIGA,
                memory_bytes_per_s=20 * _GIGA, memory_capacity_bytes=None, source="nominal",
                device_kinds=("cpu",)),
)}


def peaks_by_name(name: str) -> DevicePeaks:
    """The table entry called `name` (e.g. "h100-sxm"). Raises ValueError listing the names."""
    if name not in PEAKS:
        raise ValueError(f"peaks={name!r}: not in the table; known: {', '.join(PEAKS)}")
    return PEAKS[name]


def peaks_for_device(device: jax.Device) -> DevicePeaks:  # pyright: ignore[reportInvalidTypeForm]
    """The table entry whose device_kinds contain `device.device_kind` exactly.

    Raises:
      ValueError: the device kind is not in the table (names it; use calibrate() or a table name).
    """
    kind = device.device_kind
    for peaks in PEAKS.values():
        if kind in peaks.device_kinds:
            return peaks
    raise ValueError(f"device_kind={kind!r}: no peak table entry; pass --calibrate or --peaks "
                     f"NAME (one of {', '.join(PEAKS)})")


def _best_time(fn: Callable[[jax.Array], jax.Array], arg: jax.Array, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn(arg) after one warm-up call."""
    import jax

    jax.block_until_ready(fn(arg))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_copy_bandwidth(device: jax.Device,  # pyright: ignore[reportInvalidTypeForm]
                           num_bytes: int, repeats: int = 5) -> float:
    """Bytes per second of y = x * 2 over a float32 array of `num_bytes` (read + write)."""
    import jax
    import jax.numpy as jnp

    if num_bytes < 4096:
        raise ValueError(f"num_bytes={num_bytes!r}: must be >= 4096")
    x = jax.device_put(jnp.ones((num_bytes // 4,), jnp.float32), device)
    fn = jax.jit(lambda a: a * 2)
    seconds = _best_time(fn, x, repeats)
    return 2 * x.nbytes / seconds


def measure_matmul_rate(device: jax.Device,  # pyright: ignore[reportInvalidTypeForm]
                        dim: int, dtype: str, repeats: int = 5, chain: int = 8) -> float:
    """FLOP/s of `chain` dependent [dim, dim] x [dim, dim] matmuls in `dtype` in one program."""
    import jax
    import jax.numpy as jnp

    if dim < 16:
        raise ValueError(f"dim={dim!r}: must be >= 16")
    a = jax.device_put(jnp.full((dim, dim), 1.0 / dim, dtype), device)

    def body(x: jax.Array) -> jax.Array:
        for _ in range(chain):  # dependent products: XLA cannot drop or merge them
            x = x @ a
        return x

    seconds = _best_time(jax.jit(body), a, repeats)
    return chain * 2 * dim**3 / seconds


def calibrate(device: jax.Device | None = None,  # pyright: ignore[reportInvalidTypeForm]
              *, copy_bytes: int | None = None, matmul_dim: int | None = None,
              repeats: int = 5) -> DevicePeaks:
    """Measures copy bandwidth and bf16/float32 matmul rates on `device` (default: the first).

    Defaults: 1 GiB copies and 8192-wide matmuls on GPUs, 64 MiB and 512-wide on CPUs. What this
    reports is achieved throughput of simple XLA programs, a lower bound on the hardware peak.
    """
    import jax

    # A new name: pyright sees `device` as Unknown | None and would keep the None.
    dev = device if device is not None else jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    copy_bytes = copy_bytes or (64 * 2**20 if on_cpu else 2**30)
    matmul_dim = matmul_dim or (512 if on_cpu else 8192)
    bandwidth = measure_copy_bandwidth(dev, copy_bytes, repeats)
    bf16 = measure_matmul_rate(dev, matmul_dim, "bfloat16", repeats)
    fp32 = measure_matmul_rate(dev, matmul_dim, "float32", repeats)
    capacity = None
    stats = dev.memory_stats() if not on_cpu else None
    if stats and "bytes_limit" in stats:
        capacity = int(stats["bytes_limit"])
    return DevicePeaks(name=f"calibrated:{dev.device_kind}", bf16_flops_per_s=bf16,
                       fp32_flops_per_s=fp32, memory_bytes_per_s=bandwidth,
                       memory_capacity_bytes=capacity, source="measured",
                       device_kinds=(dev.device_kind,))


@contextlib.contextmanager
def primary_contexts(ordinals: Sequence[int], cuda: Any = None,
                     ) -> Iterator[tuple[Any, dict[int, ctypes.c_void_p]]]:
    """Retains the primary contexts of CUDA devices `ordinals` (jax's `local_hardware_id`) and
    yields (the driver library, {ordinal: context}); releases every context it retained on exit,
    also when a retain or the body fails. `cuda`: the driver library (libcuda.so.1 by default).

    Raises:
      OSError: no CUDA driver. RuntimeError: a retain failed, naming the device.
    """
    cuda = cuda if cuda is not None else ctypes.CDLL("libcuda.so.1")
    ctxs: dict[int, ctypes.c_void_p] = {}
    try:
        for o in ordinals:
            ctx = ctypes.c_void_p()
            rc = cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), o)
            if rc:
                raise RuntimeError(f"cuDevicePrimaryCtxRetain(device {o}) failed: CUDA error "
                                   f"{rc}")
            ctxs[o] = ctx
        yield cuda, ctxs
    finally:
        for o in ctxs:
            cuda.cuDevicePrimaryCtxRelease_v2(o)


@contextlib.contextmanager
def pushed(cuda: Any, ctx: ctypes.c_void_p, device: int) -> Iterator[None]:
    """Makes `ctx` (device `device`'s) the calling thread's current context for the body.

    Raises:
      RuntimeError: the push failed, naming the device.
    """
    rc = cuda.cuCtxPushCurrent_v2(ctx)
    if rc:
        raise RuntimeError(f"cuCtxPushCurrent(device {device}) failed: CUDA error {rc}")
    try:
        yield
    finally:
        cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))


def cuda_memory_info(ordinal: int, cuda: Any = None) -> tuple[int, int] | None:
    """(free, total) bytes of CUDA device `ordinal` (jax's `local_hardware_id`), from the
    driver's cuMemGetInfo in the device's primary context (the one XLA uses); None without a
    CUDA driver or when a driver call fails. Free memory counts every process's allocations.
    `cuda`: the driver library (tests pass a fake).
    """
    try:
        with primary_contexts([ordinal], cuda) as (lib, ctxs), pushed(lib, ctxs[ordinal],
                                                                       ordinal):
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            rc = lib.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total))
    except (OSError, RuntimeError):
        return None
    return (int(free.value), int(total.value)) if rc == 0 else None
