"""The one-shot all-reduce kernel (sharding/all_reduce.py) against jax.lax.psum.

On CPU (CI) only what does not need a GPU is checked: the PTX's parameter list matches the
launch's, message limits, and availability reasons. On two or more GPUs (run with
``JAX_PLATFORMS=cuda pytest tests/sharding/test_all_reduce.py``) the kernel is compared with
psum on random inputs of every supported dtype and of sizes from one vector to the 1 MiB limit,
many calls in a row (the flags and slots cycle), and inside one program as a chain (how the
model calls it).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xlaserve.sharding import all_reduce as ar
from xlaserve.sharding.specs import _shard_map


@pytest.mark.parametrize("tp,dtype", [(2, "bfloat16"), (4, "float32"), (8, "float16")])
def test_ptx_parameters_match_the_launch(tp: int, dtype: str) -> None:
    """x, rank, out, tp workspace addresses, nvec (what `AllReduce._opaque` passes)."""
    ptx = ar.all_reduce_ptx(tp, dtype, 90)
    params = re.findall(r"\.param \.(u64|u32) (\w+)", ptx)
    names = [n for _, n in params]
    assert names == (["p_x", "p_rank", "p_out"] + [f"p_ws{r}" for r in range(tp)]
                     + ["p_nvec"])
    assert f".entry {ar.kernel_name(tp, dtype)}(" in ptx and ".target sm_90" in ptx
    labels = re.findall(r"^(\w+):$", ptx, re.M)
    assert len(labels) == len(set(labels)) == 5 + 3 * tp
    for label in labels:
        assert f"bra {label};" in ptx
    # each peer's two LL lines are polled (own vector from x), two stores per peer
    assert ptx.count("ld.volatile.global.v4.b32") == 2 * tp
    assert ptx.count("st.volatile.global.v4.b32") == 2 * tp


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="no ptxas (CUDA toolkit) here")
@pytest.mark.parametrize("tp,dtype", [(2, "bfloat16"), (2, "float32"), (4, "float16"),
                                      (8, "bfloat16")])
def test_ptx_assembles(tp: int, dtype: str, tmp_path) -> None:
    """ptxas accepts the generated PTX (what jaxlib does before the first launch)."""
    src = tmp_path / "k.ptx"
    src.write_text(ar.all_reduce_ptx(tp, dtype, 90))
    out = subprocess.run(["ptxas", "-arch=sm_90", str(src), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_limits() -> None:
    assert ar.fits((16, 4096), jnp.bfloat16)  # a decode step of an 8B model: 128 KiB
    assert ar.fits((128, 4096), jnp.bfloat16)  # 1 MiB
    assert not ar.fits((256, 4096), jnp.bfloat16)  # prefill-sized: XLA's collective
    assert not ar.fits((3, 3), jnp.float32)  # not a multiple of 16 bytes
    assert not ar.fits((16, 64), jnp.int32)
    with pytest.raises(ValueError, match="tp=9"):
        ar.all_reduce_ptx(9, "bfloat16", 90)
    assert ar.workspace_bytes(2) == 4096 + 128 * 2 * 2 * 16384  # 8 MiB


@pytest.mark.skipif(jax.devices()[0].platform != "cpu", reason="CPU devices")
def test_availability_reasons_on_cpu() -> None:
    devs = np.array(jax.devices()[:2]).reshape(1, 2)
    assert "platform cpu" in ar.availability(Mesh(devs, ("data", "model")))
    one = np.array(jax.devices()[:1]).reshape(1, 1)
    assert "< 2" in ar.availability(Mesh(one, ("data", "model")))
    two_rows = np.array(jax.devices()[:4]).reshape(2, 2)
    assert "data axis" in ar.availability(Mesh(two_rows, ("data", "model")))


def test_support_reasons() -> None:
    assert ar.support_reason((0, 11), 90, "") is None
    assert "Triton kernel-call" in ar.support_reason((0, 11), None, "")
    assert "jax 0.10" in ar.support_reason((0, 10), 90, "")
    assert "compute capability 7.5" in ar.support_reason((0, 11), 75, "")
    assert "cuda_async" in ar.support_reason((0, 11), 90, "cuda_async")


def test_identity_ignores_the_workspace() -> None:
    """The kernel is a static part of the jitted step: equal addresses, equal programs."""
    a = ar.AllReduce(2, (1 << 20, 2 << 20), 90, workspace=object())
    b = ar.AllReduce(2, (1 << 20, 2 << 20), 90, workspace=object())
    assert a == b and hash(a) == hash(b)
    assert a != ar.AllReduce(2, (1 << 20, 3 << 20), 90)


@dataclasses.dataclass(frozen=True)
class _FakeKernel:
    """Stands in for AllReduce on CPU: psum over the model axis."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.lax.psum(x, "model")


@pytest.mark.parametrize("tokens,kernel", [(16, True), (4096, True), (4097, False)])
def test_row_parallel_uses_the_kernel_up_to_its_limit(tokens: int, kernel: bool) -> None:
    """down_proj [T, F] x [F, D], D 64 f32: 4096 tokens are exactly 1 MiB per device (the
    kernel), one more is over (the partitioner's collective, no shard_map)."""
    from xlaserve.runtime.config import ModelConfig
    from xlaserve.sharding.specs import ShardedRowParallel

    cfg = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
                      num_layers=1, num_heads=8, num_kv_heads=4, head_dim=8,
                      max_position_embeddings=128, dtype="float32")
    mesh = Mesh(np.array(jax.devices()[:2]).reshape(1, 2), ("data", "model"))
    rp = ShardedRowParallel(mesh, cfg, _FakeKernel())  # type: ignore[arg-type]
    x = jax.ShapeDtypeStruct((tokens, 128), jnp.float32)
    w = jax.ShapeDtypeStruct((128, 64), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda x, w: rp(x, w, ("mlp",), ("embed",)))(x, w))
    assert rp.uses_kernel((tokens, 64), jnp.float32) == kernel
    assert ("shard_map[" in jaxpr) == kernel and ("psum" in jaxpr) == kernel


def _gpus() -> list[jax.Device]:
    try:
        return jax.devices("gpu")
    except RuntimeError:
        return []


needs_gpus = pytest.mark.skipif(len(_gpus()) < 2, reason="needs 2+ GPUs")


@functools.lru_cache(maxsize=None)
def _setup(tp: int) -> tuple[Mesh, ar.AllReduce]:
    mesh = Mesh(np.array(_gpus()[:tp]).reshape(1, tp), ("data", "model"))
    return mesh, ar.AllReduce.create(mesh)


def _reduce_fns(mesh: Mesh, kernel: ar.AllReduce, chain: int = 1):
    """(kernel, psum) programs over x [tp, ...] split on dim 0: `chain` dependent all-reduces."""
    spec = PartitionSpec("model")

    def make(reduce):
        def body(x):  # [1, ...] this rank's part
            y = x[0]
            for i in range(chain):
                y = reduce(y) if i == 0 else reduce(y * 0.5 + x[0])
            return y[None]
        return jax.jit(_shard_map(body, mesh, in_specs=(spec,), out_specs=spec))

    return make(kernel), make(functools.partial(jax.lax.psum, axis_name="model"))


@needs_gpus
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape", [(1, 8), (1, 4096), (16, 4096), (37, 1024), (128, 4096)])
def test_kernel_equals_psum(dtype: str, shape: tuple[int, ...]) -> None:
    tp = min(len(_gpus()), 8)
    mesh, kernel = _setup(tp)
    if not ar.fits(shape, dtype):
        pytest.skip("over the kernel's limit for this dtype")
    fn, ref = _reduce_fns(mesh, kernel)
    sharding = NamedSharding(mesh, PartitionSpec("model"))
    rng = np.random.default_rng(0)
    for _ in range(5):  # the flags and slots cycle across calls
        x = jax.device_put(rng.standard_normal((tp, *shape)).astype(dtype), sharding)
        got, want = np.asarray(fn(x), np.float32), np.asarray(ref(x), np.float32)
        # every rank holds the same sum; for 2 ranks it is bit-equal to psum's
        assert all((got[r] == got[0]).all() for r in range(tp))
        if tp == 2:
            np.testing.assert_array_equal(got, want)
        else:
            tol = 1e-2 if dtype != "float32" else 1e-5
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@needs_gpus
@pytest.mark.gpu
def test_chain_of_all_reduces_in_one_program() -> None:
    """64 dependent all-reduces in one program (a 32-layer decode step's count), 20 calls with
    fresh inputs, each checked (stale data from an earlier call would show), then programs of
    1 and 128 CTAs in turn (different CTAs' counters advance differently)."""
    tp = min(len(_gpus()), 8)
    mesh, kernel = _setup(tp)
    fn, ref = _reduce_fns(mesh, kernel, chain=64)
    sharding = NamedSharding(mesh, PartitionSpec("model"))
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = jax.device_put(rng.standard_normal((tp, 16, 4096)).astype(np.float32) * 0.01,
                           sharding)
        np.testing.assert_allclose(np.asarray(fn(x)), np.asarray(ref(x)), rtol=1e-5, atol=1e-5)
    small, small_ref = _reduce_fns(mesh, kernel)
    for shape in [(1, 2048), (64, 4096), (1, 2048), (1, 8), (64, 4096)]:  # 1, 128, 1, 1, 128 CTAs
        x = jax.device_put(rng.standard_normal((tp, *shape)).astype(np.float32), sharding)
        np.testing.assert_allclose(np.asarray(small(x)), np.asarray(small_ref(x)), rtol=1e-5,
                                   atol=1e-5)
