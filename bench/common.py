"""GPU timing and roofline helpers shared by the kernel benchmarks (bench/ only; never imported by
package code).

`time_fn` times back-to-back calls of a jitted function: it dispatches `iters` calls without
waiting, blocks on the last, and takes the median over `repeats` such runs (host dispatch
overlaps device work, but a call shorter than its dispatch is timed as dispatch). `time_in_jit`
runs n dependent calls inside one program, so small kernels are timed on the device.
`copy_bandwidth` and `matmul_rate` measure the two ceilings on the device in the same process,
as the issue asks.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import xlaserve  # noqa: F401  (first: sets xlaserve's default XLA flags)
import jax
import jax.numpy as jnp


def device_info() -> dict[str, Any]:
    d = jax.devices()[0]
    return {"device": f"{d.platform}:{d.device_kind}", "jax": jax.__version__,
            "python": platform.python_version(), "command": " ".join(sys.argv)}


def time_fn(fn: Callable[..., Any], *args: Any, iters: int = 20, repeats: int = 5,
            warmup: int = 2) -> float:
    """Median seconds per call of fn(*args) (already jitted), dispatched back to back."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / iters)
    return statistics.median(samples)


def time_in_jit(fn: Callable[..., Any], *args: Any, n: int = 10, repeats: int = 5) -> float:
    """Device seconds per call of fn(x, *rest): n dependent calls inside one jitted program.

    Host dispatch is paid once per n calls. Each call's output is summed (so XLA cannot drop
    any of it) and the sum is written into one element of the next call's first argument, so the
    calls run in order and none can be merged. The sum's small reduction is counted in.
    """
    def many(x: jax.Array, *rest: Any) -> jax.Array:
        acc = jnp.zeros((), jnp.float32)
        for _ in range(n):
            out = fn(x, *rest)
            total = jnp.sum(out.astype(jnp.float32))
            acc = acc + total
            x = x.at[(0,) * x.ndim].set((total * 1e-9).astype(x.dtype))
        return acc

    return time_fn(jax.jit(many), *args, iters=3, repeats=repeats, warmup=1) / n


def run_shapes(shapes: list[dict[str, Any]], only: str,
               run: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """Yields run(s) for each shape whose "name" is in the comma-separated `only` (all when
    empty), with the seconds it took under "seconds"."""
    for s in shapes:
        if only and s["name"] not in only.split(","):
            continue
        t0 = time.time()
        r = run(s)
        r["seconds"] = time.time() - t0
        yield r


def copy_bandwidth(num_bytes: int = 2 << 30) -> float:
    """Bytes/s of a device elementwise copy (x + 1 over bf16), counting bytes read plus written."""
    x = jax.random.normal(jax.random.key(0), (num_bytes // 2,), jnp.bfloat16)
    fn = jax.jit(lambda a: a + 1)
    seconds = time_fn(fn, x, iters=10, repeats=5)
    return 2 * x.nbytes / seconds


def read_bandwidth(num_bytes: int = 2 << 30) -> dict[str, float]:
    """Bytes/s of reductions that read num_bytes of bf16 and write ~nothing: the read-only ceiling.

    A kernel that only reads (attention decode streams K/V and writes a few rows) can go past the
    copy rate, whose writes share the HBM bus. Two XLA reductions over [n, 8192] (row sums and
    column sums, f32 accumulation); the faster one is the ceiling reported as "read".
    """
    x = jax.random.normal(jax.random.key(3), (num_bytes // 2 // 8192, 8192), jnp.bfloat16)
    out = {}
    for name, axis in (("read_rows", 1), ("read_cols", 0)):
        fn = jax.jit(lambda a, axis=axis: jnp.sum(a, axis=axis, dtype=jnp.float32))
        out[name] = x.nbytes / time_fn(fn, x, iters=10, repeats=5)
    out["read"] = max(out.values())
    return out


def matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n x n x n bf16 matrix product on random data (f32 accumulation)."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    fn = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(x.dtype))
    seconds = time_fn(fn, a, b, iters=10, repeats=5)
    return 2 * n ** 3 / seconds


def relative_error(out: jax.Array, ref: jax.Array) -> float:
    out = jnp.asarray(out, jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
