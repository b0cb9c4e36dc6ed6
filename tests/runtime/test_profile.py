"""Tests of `xlaserve profile`: HLO/cost/memory analysis, peaks and roofline, the CLI end to end.

The CLI tests run the built-in tiny model on CPU with small buckets; they share one compilation
cache directory per module so the second run can report cache hits.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

from xlaserve.runtime import hardware
from xlaserve.runtime import profile as prof

HLO_SAMPLE = """\
HloModule jit_step, entry_computation_layout={(f32[16,64]{1,0})->f32[16,64]{1,0}}

%fused_computation (param_0: f32[16,64]) -> f32[16,64] {
  %param_0 = f32[16,64]{1,0} parameter(0)
  ROOT %tanh.0 = f32[16,64]{1,0} tanh(%param_0), metadata={op_name="jit(step)/tanh"}
}

ENTRY %main.1 (x.1: f32[16,64]) -> (f32[16,64], bf16[2]) {
  %x.1 = f32[16,64]{1,0} parameter(0), metadata={op_name="x"}
  %fusion.1 = f32[16,64]{1,0} fusion(%x.1), kind=kLoop, calls=%fused_computation
  %cc0 = (f32[16,64]{1,0}, s8[0]{0}) custom-call(%fusion.1), custom_call_target="__cublas$gemm"
  %cc1 = bf16[2]{0} custom-call(%x.1), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(step)/attn/pallas_call"}, backend_config={name = "ragged_paged_attention_fwd"}
  %cc2 = bf16[2]{0} custom-call(%cc1), custom_call_target="__gpu$xla.gpu.triton", backend_config={ir="x", name="ragged_paged_attention_fwd"}
  %gte = f32[16,64]{1,0} get-tuple-element(%cc0), index=0
  ROOT %t = (f32[16,64]{1,0}, bf16[2]{0}) tuple(%gte, %cc2)
}
"""


def test_hlo_stats_counts_instructions_fusions_and_kernels():
    stats = prof.hlo_stats(HLO_SAMPLE)
    assert stats.num_instructions == 9
    assert stats.num_fusions == 1
    assert stats.custom_calls == {"__cublas$gemm": 1, "__gpu$xla.gpu.triton": 2}
    assert stats.pallas_kernels == ("ragged_paged_attention_fwd",)
    assert prof.attention_impl_from_hlo(stats) == "pallas-triton"


def test_hlo_stats_of_a_real_compiled_program():
    f = jax.jit(lambda w, x: jnp.tanh(x @ w) @ w.T)
    compiled = f.lower(jnp.ones((32, 32)), jnp.ones((16, 32))).compile()
    stats = prof.hlo_stats(compiled.as_text())
    assert stats.num_instructions >= 4
    assert stats.pallas_kernels == ()
    assert prof.attention_impl_from_hlo(stats) == "reference"


def test_roofline_is_the_larger_of_compute_and_memory_time():
    peaks = hardware.peaks_by_name("h100-sxm")
    t, bound = prof.roofline_seconds(1e12, 1e6, peaks, "bfloat16")
    assert bound == "compute" and t == pytest.approx(1e12 / 989.4e12)
    t, bound = prof.roofline_seconds(1e6, 3.35e9, peaks, "bfloat16")
    assert bound == "memory" and t == pytest.approx(1e-3)
    t32, _ = prof.roofline_seconds(1e12, 0, peaks, "float32")
    assert t32 == pytest.approx(2 * 1e12 / 989.4e12)


def test_peak_table_lookup_and_validation():
    class FakeDevice:
        device_kind = "NVIDIA H100 80GB HBM3"

    assert hardware.peaks_for_device(FakeDevice()).name == "h100-sxm"  # type: ignore[arg-type]
    FakeDevice.device_kind = "NVIDIA H200"
    assert hardware.peaks_for_device(FakeDevice()).memory_bytes_per_s == 4.8e12  # type: ignore
    FakeDevice.device_kind = "Mystery GPU 9000"
    with pytest.raises(ValueError, match="Mystery GPU 9000"):
        hardware.peaks_for_device(FakeDevice())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="peaks='nope'"):
        hardware.peaks_by_name("nope")
    with pytest.raises(ValueError, match="memory_bytes_per_s=0"):
        hardware.DevicePeaks("x", 1.0, 1.0, 0, None, "measured")
    assert hardware.peaks_for_device(jax.devices()[0]).source == "nominal"  # CPU in CI


def test_calibrate_measures_positive_rates_on_cpu():
    peaks = hardware.calibrate(copy_bytes=1 << 20, matmul_dim=64, repeats=2)
    assert peaks.source == "measured"
    assert peaks.bf16_flops_per_s > 1e6 and peaks.memory_bytes_per_s > 1e6


def test_analyze_compiled_and_monitor_on_a_stand_in_step():
    f = jax.jit(lambda w, x: jnp.tanh(x @ w) @ w.T)
    peaks = hardware.peaks_by_name("cpu-nominal")
    flops = []
    for t in (16, 64):
        with prof.CompileMonitor() as mon:
            lowered = f.lower(jax.ShapeDtypeStruct((64, 64), jnp.float32),
                              jax.ShapeDtypeStruct((t, 64), jnp.float32))
            compiled = lowered.compile()
        assert [c.fun_name for c in mon.compiles] == ["jit(<lambda>)"]
        assert f"float32[{t},64]" in mon.compiles[0].shapes
        bp = prof.analyze_compiled(t, 8, lowered=lowered, compiled=compiled, lower_s=0.1,
                                   compile_s=0.2, cache_hit=None, peaks=peaks, dtype="float32")
        assert bp.memory.argument_bytes == (64 * 64 + t * 64) * 4
        assert bp.roofline_s == pytest.approx(max(bp.flops / peaks.fp32_flops_per_s,
                                                  bp.bytes_accessed / peaks.memory_bytes_per_s))
        flops.append(bp.flops)
    assert flops[1] > flops[0] > 0
