"""Early launch of dependents (pallas_kernels/pdl.py): which kernels carry the PTX trigger, and
that a chain of triggering kernels still computes what the reference does.

The lowering tests run anywhere: jax lowers the Pallas Triton kernels for "cuda" on the CPU
too, and the Triton module (with the inline asm's text) sits in the custom call's config. The
chain test runs compiled on a GPU of compute capability >= 9.0 only (skipping elsewhere).
"""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xlaserve.pallas_kernels import pdl
from xlaserve.pallas_kernels import ragged_paged_attention as rpa
from xlaserve.pallas_kernels.rope_write_kv import rope_write_kv
from xlaserve.pallas_kernels.skinny_gemm import (SkinnyGemmConfig, skinny_gemm,
                                                 skinny_gemm_swiglu)

BF16 = jnp.bfloat16
SDS = jax.ShapeDtypeStruct


def _gemm(x, w):
    return skinny_gemm(x, (w,), config=SkinnyGemmConfig(block_n=64, block_k=64, num_splits=2))


def _swiglu(x, g, u):
    return skinny_gemm_swiglu(x, g, u, config=SkinnyGemmConfig(block_n=32, block_k=64,
                                                               num_splits=1))


def _rope(parts, cos, sin, slots, kp, vp):
    return rope_write_kv(parts, cos, sin, slots, kp, vp, num_q_heads=4, dtype=BF16)


def _attention(q, kp, vp, kv_lens, table, cu, n):
    return rpa.ragged_paged_attention(q, kp, vp, kv_lens, table, cu, n, sm_scale=0.125)


I32 = jnp.int32
KERNELS = {  # name: (function, argument shapes)
    "skinny_gemm": (_gemm, [SDS((16, 256), BF16), SDS((256, 128), BF16)]),
    "skinny_gemm_swiglu": (_swiglu, [SDS((16, 128), BF16)] + [SDS((128, 64), BF16)] * 2),
    "rope_write_kv": (_rope, [SDS((2, 4, 8 * 64), jnp.float32), SDS((4, 32), jnp.float32),
                              SDS((4, 32), jnp.float32), SDS((4,), I32),
                              SDS((2, 8, 16, 64), BF16), SDS((2, 8, 16, 64), BF16)]),
    "ragged_paged_attention": (_attention, [SDS((4, 8, 64), BF16), SDS((2, 8, 16, 64), BF16),
                                            SDS((2, 8, 16, 64), BF16), SDS((2,), I32),
                                            SDS((2, 4), I32), SDS((3,), I32), SDS((1,), I32)]),
}


def _cuda_text(fn, specs) -> str:
    """The StableHLO of `fn` lowered for CUDA (the Triton modules inside its custom calls),
    each Triton module checked by its dialects' verifiers as XLA's parser checks it (session
    23: a rank-0 tensor result passed here unverified and failed on the GPU)."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    lower = registration.lowering.lower_jaxpr_to_triton_module

    def verified(*args, **kwargs):
        result = lower(*args, **kwargs)
        assert result.module.operation.verify()
        return result

    jax.clear_caches()  # the wrappers are jitted: re-trace so pdl.enabled() is asked again
    with mock.patch.object(registration.lowering, "lower_jaxpr_to_triton_module", verified):
        return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name", list(KERNELS))
def test_trigger_in_compiled_kernels(name, monkeypatch):
    fn, specs = KERNELS[name]
    monkeypatch.setenv(pdl.ENV, "1")
    with mock.patch.object(pdl, "unsupported", lambda: None):  # as on an H100 / H200
        on = _cuda_text(fn, specs)
        monkeypatch.setenv(pdl.ENV, "0")
        off = _cuda_text(fn, specs)
    assert "__gpu$xla.gpu.triton" in on
    assert on.count(pdl.PTX) == 1, f"{name}: expected one trigger in the kernel"
    assert pdl.PTX not in off


def test_default_triggers_only_gate_up(monkeypatch):
    """By default only skinny_gemm_swiglu triggers (the A/B in pdl's docstring)."""
    monkeypatch.delenv(pdl.ENV, raising=False)
    with mock.patch.object(pdl, "unsupported", lambda: None):
        texts = {name: _cuda_text(*KERNELS[name]) for name in KERNELS}
    assert {name for name, text in texts.items() if pdl.PTX in text} == {"skinny_gemm_swiglu"}


def test_describe(monkeypatch):
    monkeypatch.delenv(pdl.ENV, raising=False)
    with mock.patch.object(pdl, "unsupported", lambda: None):
        assert pdl.describe() == ("griddepcontrol.launch_dependents at the start of "
                                  "skinny_gemm_swiglu (the default)")
        monkeypatch.setenv(pdl.ENV, "0")
        assert pdl.describe() == "off (XLASERVE_EARLY_LAUNCH='0')"
    with mock.patch.object(pdl, "unsupported", lambda: "compute capability 8.0 < 9.0"):
        assert pdl.describe() == "off: compute capability 8.0 < 9.0"


def test_no_trigger_below_sm90(monkeypatch):
    monkeypatch.setenv(pdl.ENV, "1")
    fn, specs = KERNELS["skinny_gemm"]
    with mock.patch.object(pdl, "unsupported", lambda: "compute capability 8.0 < 9.0"):
        text = _cuda_text(fn, specs)
    assert "__gpu$xla.gpu.triton" in text and pdl.PTX not in text


def test_enabled_rules(monkeypatch):
    monkeypatch.delenv(pdl.ENV, raising=False)
    gemm, rope = "skinny_gemm", "rope_write_kv"
    swiglu = "skinny_gemm_swiglu"
    with mock.patch.object(pdl, "unsupported", lambda: None):
        assert pdl.enabled(False, swiglu) and not pdl.enabled(False, gemm)  # the default
        assert not pdl.enabled(True, swiglu)  # the interpreter has no PTX
        monkeypatch.setenv(pdl.ENV, "1")
        assert pdl.enabled(False, gemm) and pdl.enabled(False, rope)
        monkeypatch.setenv(pdl.ENV, "0")
        assert not pdl.enabled(False, gemm)
        monkeypatch.setenv(pdl.ENV, "rope_write_kv, ragged_paged_attention")
        assert pdl.enabled(False, rope) and not pdl.enabled(False, gemm)
        monkeypatch.setenv(pdl.ENV, "rope")
        with pytest.raises(ValueError, match="XLASERVE_EARLY_LAUNCH='rope'"):
            pdl.enabled(False, rope)
        with pytest.raises(ValueError, match="family='gemm'"):
            pdl.enabled(False, "gemm")
    monkeypatch.delenv(pdl.ENV)
    if jax.default_backend() != "gpu":
        assert not pdl.enabled(False, swiglu)  # the real check: no GPU here


def test_chain_matches_reference_on_gpu(monkeypatch):
    """64 dependent GEMMs in one jit, each reading the last one's output at once: a trigger
    that let a kernel read before its producer ended would show as a wrong link. Each link is
    checked against numpy on the kernel's own input, so rounding does not compound."""
    if jax.default_backend() != "gpu" or pdl.unsupported():
        pytest.skip("needs a GPU of compute capability >= 9.0")
    monkeypatch.setenv(pdl.ENV, "1")  # skinny_gemm does not trigger by default
    jax.clear_caches()
    cfg = SkinnyGemmConfig(block_n=64, block_k=128, num_splits=1)
    key = jax.random.key(0)
    x = jax.random.normal(key, (16, 1024), jnp.float32).astype(BF16)
    ws = (jax.random.normal(jax.random.fold_in(key, 1), (4, 1024, 1024)) / 32).astype(BF16)

    @jax.jit
    def chain(x, ws):
        outs = []
        for i in range(64):
            x = skinny_gemm(x, (ws[i % 4],), config=cfg)[0].astype(BF16)
            outs.append(x)
        return jnp.stack(outs)

    outs = np.asarray(chain(x, ws), np.float32)  # [64, 16, 1024]
    assert pdl.PTX in chain.lower(x, ws).as_text()
    w32 = np.asarray(ws, np.float32)
    ins = np.concatenate([np.asarray(x, np.float32)[None], outs[:-1]])
    for i in range(64):
        np.testing.assert_allclose(outs[i], ins[i] @ w32[i % 4], rtol=2e-2, atol=2e-2,
                                   err_msg=f"link {i}")
