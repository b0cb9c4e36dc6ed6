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
    for t in (16, 32):
        with prof.CompileMonitor() as mon:
            lowered = f.lower(jax.ShapeDtypeStruct((64, 64), jnp.float32),
                              jax.ShapeDtypeStruct((t, 64), jnp.float32))
            compiled = lowered.compile()
        assert [c.fun_name for c in mon.compiles] == ["jit(<lambda>)"]
        assert mon.compiles[0].shapes == f"f32[64,64], f32[{t},64]"
        bp = prof.analyze_compiled(t, 8, compiled=compiled, lower_s=0.1,
                                   compile_s=0.2, cache_hit=None, peaks=peaks, dtype="float32")
        assert bp.memory.argument_bytes == (64 * 64 + t * 64) * 4
        assert bp.roofline_s == pytest.approx(max(bp.flops / peaks.fp32_flops_per_s,
                                                  bp.bytes_accessed / peaks.memory_bytes_per_s))
        flops.append(bp.flops)
    assert flops[1] > flops[0] > 0


def test_compact_shapes_collapses_repeats():
    text = ("(ShapedArray(float32[64]), ShapedArray(float32[64]), ShapedArray(int32[24]), "
            "ShapedArray(float32[], weak_type=True))")
    assert prof.compact_shapes(text) == "f32[64] x2, i32[24], f32[]"


# ---------------------------------------------------------------------------- the CLI, end to end

TINY = ["--model", "builtin:tiny", "--dtype", "float32", "--max-num-batched-tokens", "32",
        "--max-num-seqs", "8", "--max-model-len", "64", "--num-pages", "32"]


def _profile(*argv: str) -> int:
    from xlaserve.cli import main

    return main(["profile", *TINY, *argv])


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    assert _profile("--peaks", "nope") == 2
    assert "peaks='nope'" in capsys.readouterr().err
    assert _profile("--buckets", "16", "--check-recompiles", "2") == 2
    assert _profile("--repeats", "0") == 2
    assert _profile("--force-shape", "24", "--check-recompiles", "1") == 2
    assert _profile("--force-shape", "24x8") == 2  # only with --check-recompiles


def test_select_buckets():
    from xlaserve.cli import UsageError
    from xlaserve.commands.profile import select_buckets

    have = [(16, 8), (32, 8), (32, 16)]
    assert select_buckets(None, have) == have
    assert select_buckets(["32"], have) == [(32, 8), (32, 16)]
    assert select_buckets(["32x16", "16x8"], have) == [(32, 16), (16, 8)]
    with pytest.raises(UsageError, match="64x8"):
        select_buckets(["64x8"], have)
    with pytest.raises(UsageError, match="expected T or TxS"):
        select_buckets(["big"], have)


@pytest.fixture(scope="module")
def cold_run(tmp_path_factory):
    """One cold profile run (fresh compilation cache) with --run, --plot, --check-recompiles."""
    d = tmp_path_factory.mktemp("profile")
    cache = d / "jax_cache"
    rc = _profile("--compilation-cache-dir", str(cache), "--json", str(d / "cold.json"),
                  "--run", "--repeats", "2", "--plot", str(d / "plot.png"),
                  "--dump-hlo", str(d / "hlo"), "--check-recompiles", "3")
    return rc, json.loads((d / "cold.json").read_text()), d


@pytest.mark.slow
def test_cli_json_fields_are_present_and_consistent(cold_run):
    rc, report, d = cold_run
    assert rc == 0  # a clean engine: no compile after warm-up
    assert report["recompiles"]["compiles_after_warmup"] == []
    assert report["recompiles"]["runner_compiles_after_warmup"] == 0
    assert report["recompiles"]["num_steps"] > 0
    buckets = report["buckets"]
    runner = report["runner"]
    assert len(buckets) == len(runner["history_widths"]) * 2  # T in (16, 32), S = 8
    peaks = report["peaks"]
    summary = report["summary"]
    for b in buckets:
        assert b["cache_hit"] is False  # a fresh cache directory
        assert b["lower_s"] > 0 and b["compile_s"] > 0
        assert b["hlo"]["num_instructions"] > b["hlo"]["num_fusions"] > 0
        assert b["attention_impl"] == "reference"  # what the dispatcher picks on CPU
        compute = b["flops"] / peaks["fp32_flops_per_s"]
        memory = b["bytes_accessed"] / peaks["memory_bytes_per_s"]
        assert b["roofline_s"] == pytest.approx(max(compute, memory))
        assert b["roofline_bound"] == ("compute" if compute >= memory else "memory")
        # Params and the whole KV cache are arguments of every step; the KV is donated.
        assert b["memory"]["argument_bytes"] >= summary["param_bytes"] + summary["kv_cache_bytes"]
        assert b["memory"]["alias_bytes"] >= summary["kv_cache_bytes"]
        assert b["measured_s"] > 0
        assert b["measured_over_roofline"] == pytest.approx(b["measured_s"] / b["roofline_s"])
        # The analytic roofline: every matmul weight once per step, 2 FLOPs/weight/token.
        assert b["model_bytes"] >= summary["param_bytes"] * 0.5
        assert b["model_flops"] >= 2 * b["num_tokens"] * summary["param_count"] * 0.5
        model = max(b["model_flops"] / peaks["fp32_flops_per_s"],
                    b["model_bytes"] / peaks["memory_bytes_per_s"])
        assert b["model_roofline_s"] == pytest.approx(model)
        assert b["measured_over_model_roofline"] == pytest.approx(
            b["measured_s"] / b["model_roofline_s"])
        name = f"step_T{b['num_tokens']}_S{b['num_seqs']}_W{b['history_width']}.hlo.txt"
        assert (d / "hlo" / name).read_text().startswith("HloModule")
    by_key = {(b["num_tokens"], b["num_seqs"], b["history_width"]): b for b in buckets}
    for w in runner["history_widths"]:
        assert by_key[(32, 8, w)]["flops"] > by_key[(16, 8, w)]["flops"]
        assert by_key[(32, 8, w)]["bytes_accessed"] > by_key[(16, 8, w)]["bytes_accessed"]
        assert by_key[(32, 8, w)]["model_flops"] > by_key[(16, 8, w)]["model_flops"]
    assert summary["kv_capacity_tokens"] == 31 * 16
    assert summary["max_concurrent_seqs"] == 31 // 4
    assert summary["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # K+V, layers, kv heads, H, f32
    assert summary["num_cache_hits"] == 0
    assert summary["compile_s_cold"] == pytest.approx(summary["compile_s_total"])
    assert (d / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert set(report["xla_flags"]) == {"XLA_FLAGS", "set_by_xlaserve", "not_set", "late",
                                        "disabled"}


@pytest.mark.slow
def test_kv_figures_are_the_models_at_tp_above_kv_heads(tmp_path):
    """tp 4 > K 2: the cache stores one copy of a KV head per device ([4, P, L, H]); the
    summary still reports the model's KV (one copy), as at tp 1, not the stored copies."""
    from xlaserve.cli import main

    model = tmp_path / "model"  # builtin:tiny's vocab (626) does not split over 4 devices
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}))
    out = tmp_path / "tp4.json"
    args = ["profile", *TINY, "--model", str(model), "--load-format", "dummy",
            "--tensor-parallel-size", "4", "--buckets", "16x8", "--no-penalty-programs",
            "--all-reduce", "psum",
            "--compilation-cache-dir", str(tmp_path / "cache"), "--json", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert report["all_reduce"].startswith("jax.lax.psum")  # the explicit row-parallel path
    assert report["decode_gemm"].startswith("XLA's GEMMs (decode_gemm='auto': the Pallas skinny "
                                            "GEMM needs an NVIDIA GPU")  # CPU: said, not silent
    assert any(n.startswith("decode GEMMs: XLA's GEMMs") for n in report["not_available"])
    assert report["early_launch"] == "off: platform 'cpu' is not an NVIDIA GPU"
    summary = report["summary"]
    per_token = 2 * 2 * 2 * 16 * 4  # K+V, layers, kv heads, H = 64 / 4, f32 (as at tp 1)
    assert summary["kv_bytes_per_token"] == per_token
    assert summary["kv_cache_bytes"] == per_token * summary["num_pages"] * summary["page_size"]


@pytest.mark.slow
def test_cli_second_run_hits_the_cache_and_a_forced_shape_fails(cold_run, capsys):
    _, cold, d = cold_run
    rc = _profile("--compilation-cache-dir", cold["runner"]["compilation_cache_dir"],
                  "--json", str(d / "warm.json"), "--check-recompiles", "1",
                  "--force-shape", "24x8")
    assert rc == 1
    warm = json.loads((d / "warm.json").read_text())
    assert [b["cache_hit"] for b in warm["buckets"]] == [True] * len(cold["buckets"])
    assert warm["summary"]["num_cache_hits"] == len(cold["buckets"])
    assert warm["summary"]["compile_s_from_cache"] == pytest.approx(
        warm["summary"]["compile_s_total"])
    late = warm["recompiles"]["compiles_after_warmup"]
    # jax's own record shows the program's arguments (the packed step inputs); the runner's
    # names the step shapes.
    assert len(late) == 1 and "i32[" in late[0]["shapes"]
    assert warm["recompiles"]["runner_compile_log"][0]["shapes"].startswith("token_ids[24]")
    captured = capsys.readouterr()
    assert "compile(s) after warm-up" in captured.err
    assert "Compiles after warm-up" in captured.out and "token_ids[24]" in captured.out


def test_timing_inputs_fill_the_bucket_with_real_sequences():
    import types

    import numpy as np

    from xlaserve.profiling.session import timing_inputs
    from xlaserve.runtime.model_runner import greedy_sampling_inputs

    def dummy_inputs(t, s, w):
        from xlaserve.runtime.batch import StepInputs

        z = np.zeros
        return StepInputs(z(t, np.int32), z(t, np.int32), z(t, np.int32), z(s + 1, np.int32),
                          z(s, np.int32), z((s, 4), np.int32), z(1, np.int32), z(s, np.int32),
                          greedy_sampling_inputs(s))

    runner = types.SimpleNamespace(page_size=16, max_pages_per_seq=4, num_pages=10,
                                   model_cfg=types.SimpleNamespace(vocab_size=100),
                                   dummy_inputs=dummy_inputs)
    x = timing_inputs(runner, 32, 8, 1, kv_len=40)
    assert x.cu_q_lens.tolist() == list(range(0, 33, 4)) and x.num_seqs.tolist() == [8]
    assert x.kv_lens.tolist() == [40] * 8 and x.logits_indices.tolist() == list(range(3, 32, 4))
    assert x.positions[:4].tolist() == [36, 37, 38, 39]
    assert (x.page_table >= 1).all() and (x.page_table < 10).all()
    assert x.slot_mapping[0] == x.page_table[0, 36 // 16] * 16 + 36 % 16
    # A bucket wider than max_model_len per sequence: extra rows are padding on page 0.
    y = timing_inputs(runner, 256, 2, 1, kv_len=8)
    assert y.kv_lens.tolist() == [64, 64] and y.cu_q_lens.tolist() == [0, 64, 128]
    assert (y.slot_mapping[128:] == 0).all() and y.positions.shape == (256,)


def test_replay_random_requests_drains_the_engine():
    from xlaserve.profiling.session import replay_random_requests
    from xlaserve.runtime.config import CacheConfig, EngineConfig, SchedulerConfig
    from xlaserve.runtime.engine import Engine
    from xlaserve.runtime.mock_runner import MockRunner

    sched = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=8, max_model_len=64)
    cfg = EngineConfig(scheduler=sched, cache=CacheConfig(num_pages=40))
    runner = MockRunner(cfg.cache, sched, vocab_size=50)
    runner.warmup()
    model_cfg = type("Cfg", (), {"vocab_size": 50, "eos_token_ids": ()})()
    engine = Engine(cfg, runner, model_config=model_cfg)  # type: ignore[arg-type]
    steps = replay_random_requests(engine, 12, seed=3)
    assert steps >= 12 and not engine.has_work()
    assert runner.compiles_after_warmup == 0


def _synthetic_report(measured: float | None) -> dict:
    bucket = {"num_tokens": 16, "num_seqs": 8, "history_width": 1, "lower_s": 0.1,
              "compile_s": 2.0, "cache_hit": True, "attention_impl": "pallas_triton:decode",
              "hlo": {"num_instructions": 10, "num_fusions": 2,
                      "custom_calls": {"__gpu$xla.gpu.triton": 2}, "pallas_kernels": ["rpa"]},
              "flops": 2e9, "bytes_accessed": 3e9,
              "memory": {"argument_bytes": 2**34, "output_bytes": 2**30, "alias_bytes": 2**30,
                         "temp_bytes": 2**28, "generated_code_bytes": 2**20,
                         "peak_bytes": 2**34 + 2**28},
              "roofline_s": 1e-3, "roofline_bound": "memory", "measured_s": measured,
              "measured_over_roofline": None if measured is None else measured / 1e-3,
              "roofline_with_attention_s": 2e-3}
    summary = {"param_count": 8_030_000_000, "param_bytes": 16 * 2**30,
               "kv_bytes_per_token": 131072, "kv_cache_bytes": 40 * 2**30, "num_pages": 20481,
               "page_size": 16, "kv_capacity_tokens": 327680, "max_model_len": 4096,
               "max_concurrent_seqs": 80, "max_num_seqs": 64, "peak_step_bytes": 2**34,
               "device_memory_bytes": 60 * 2**30, "num_buckets": 1, "num_cache_hits": 1,
               "compile_s_total": 2.1, "compile_s_cold": 0.0, "compile_s_from_cache": 2.1,
               "fits_device": True}
    return {"peaks": hardware.peaks_by_name("h100-sxm").to_json(),
            "device": {"device_kind": "NVIDIA H100 80GB HBM3", "count": 1},
            "config": {"model": "bench/configs/llama3.1-8b"},
            "model": {"model_type": "llama", "dtype": "bfloat16"}, "buckets": [bucket],
            "summary": summary,
            "xla_flags": {"XLA_FLAGS": "--xla_gpu_dot_merger_threshold_mb=512",
                          "set_by_xlaserve": ["--xla_gpu_dot_merger_threshold_mb=512"],
                          "not_set": ["--xla_gpu_experimental_use_collective_kernels=-ALL_REDUCE "
                                      "(measured with jaxlib >= 0.11.2, < 0.12; installed 0.10.2)"],
                          "late": False, "disabled": False},
            "recompiles": {"num_requests": 2, "num_steps": 5,
                           "compiles_after_warmup": [{"fun_name": "jit(_step)", "seconds": 1.0,
                                                      "shapes": "i32[24]"}],
                           "runner_compile_log": [{"shapes": "token_ids[24]",
                                                   "num_compiles": 1}]}}


def test_render_tables_and_plot_from_a_report(tmp_path):
    import io

    from rich.console import Console

    from xlaserve.profiling import render

    buf = io.StringIO()
    render.print_report(_synthetic_report(2.5e-3), Console(file=buf, width=200))
    text = buf.getvalue()
    for expected in ("pallas_triton:decode", "[rpa]", "8.03B", "16.00 GiB", "2.5x", "hit",
                     "roof+attn", "2.00 ms",
                     "Compiles after warm-up", "token_ids[24]", "fits: yes",
                     "XLA defaults NOT set", "installed 0.10.2",
                     "--xla_gpu_dot_merger_threshold_mb=512"):
        assert expected in text, expected
    for measured in (2.5e-3, None):
        path = tmp_path / f"plot_{measured}.png"
        render.plot(_synthetic_report(measured), str(path))
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_attention_cost_counts_kv_reads_and_flops():
    kw = dict(max_model_len=4096, num_layers=32, num_heads=32, head_dim=128,
              kv_bytes_per_token=131072)
    flops, nbytes = prof.attention_cost(num_tokens=64, num_seqs=64, kv_len=2048, **kw)
    assert nbytes == 64 * 2048 * 131072  # decode: every sequence reads its 2048-token context
    assert flops == 4.0 * 64 * 2048 * 32 * 128 * 32
    # Prefill: 8 sequences of 256 new tokens each attend to at least those 256 keys.
    flops, nbytes = prof.attention_cost(num_tokens=2048, num_seqs=8, kv_len=16, **kw)
    assert nbytes == 8 * 256 * 131072
    bp = prof.BucketProfile(
        num_tokens=64, num_seqs=64, lower_s=0, compile_s=0, cache_hit=None,
        attention_impl="pallas_triton:decode", hlo=prof.hlo_stats(""), flops=1e12,
        bytes_accessed=16e9, memory=prof.MemoryStats(0, 0, 0, 0, 0), roofline_s=0,
        roofline_bound="memory")
    peaks = hardware.peaks_by_name("h100-sxm")
    prof.add_attention_estimate(bp, 1e9, 17e9, peaks, "bfloat16")
    assert bp.roofline_with_attention_s == pytest.approx(33e9 / 3.35e12)


@pytest.mark.parametrize("version,noted", [("0.10.2", False), ("0.11.2", True)])
def test_profile_notes_the_triton_deprecation_on_gpu(monkeypatch, version, noted):
    """On a GPU under jax >= 0.11 the report says the kernel's Pallas backend is deprecated."""
    from xlaserve.profiling import session
    from xlaserve.runtime.config import EngineConfig

    monkeypatch.setattr(jax, "__version__", version)
    peaks = hardware.peaks_by_name("h100-sxm")  # datasheet peaks
    report = {"device": {"platform": "gpu"}, "summary": {"device_memory_bytes": 80 << 30},
              "xla_flags": {"set_by_xlaserve": ["--xla_gpu_dot_merger_threshold_mb=512"]}}
    notes = session.not_available(EngineConfig(), peaks, report)
    assert [n for n in notes if "deprecates the Pallas Triton backend" in n] == (
        [f"attention: the Pallas kernel (pallas_triton) is available (jax {version} deprecates "
         "the Pallas Triton backend; no removal version named yet, bench/NOTES_mosaic_gpu.md)"]
        if noted else [])
    assert len(notes) == int(noted)


def test_describe_decode_gemm_on_gpu():
    """On a GPU, 'auto' names the measured table, its device and the shapes it covers."""
    from xlaserve.pallas_kernels import ops

    text = ops.describe_skinny_gemm("auto", "gpu")
    assert "skinny_gemm_tuning.json" in text and "qkv_tp2" in text and "up to 16 tokens" in text
    assert "gate_up_swiglu_tp2" in text and "skinny_gemm_swiglu" in text
    assert ops.describe_skinny_gemm("xla", "gpu") == "XLA's GEMMs (decode_gemm='xla')"
    assert "every shape" in ops.describe_skinny_gemm("pallas", "gpu")
