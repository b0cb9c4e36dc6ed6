"""bench/tp_scaling.py runs end to end on the fake CPU devices and its self-checks pass."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import bench_modules  # tests/
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench" / "tp_scaling.py"


def test_shard_config_is_one_devices_share_of_the_8b() -> None:
    """--shard-of N: heads, KV heads, MLP and vocab divided by N; one KV head per device when
    N exceeds them; a size N does not divide is refused naming the field and value."""
    tps = bench_modules.load("tp_scaling")
    from xlaserve.checkpoints import hf
    cfg = hf.load_config(str(BENCH.parent / "configs" / "llama3.1-8b"))
    half = tps.shard_config(cfg, 2)
    assert (half.num_heads, half.num_kv_heads, half.head_dim, half.hidden_size,
            half.intermediate_size, half.vocab_size) == (16, 4, 128, 4096, 7168, 64128)
    assert half.num_layers == cfg.num_layers and tps.shard_config(cfg, 1) == cfg
    assert tps.shard_config(cfg, 16).num_kv_heads == 1  # 8 KV heads over 16 devices
    with pytest.raises(ValueError, match="num_heads=32 is not divisible by 3"):
        tps.shard_config(cfg, 3)
    with pytest.raises(ValueError, match="num_kv_heads=12 is not divisible by 8"):
        tps.shard_config(cfg.replace(num_heads=48, num_kv_heads=12), 8)
    with pytest.raises(ValueError, match="must be >= 1"):
        tps.shard_config(cfg, 0)


@pytest.mark.slow
def test_tp_scaling_bench_cpu_smoke(tmp_path: pathlib.Path) -> None:
    report = _run_bench(tmp_path, "--tp", "1", "4", "--slope-iters", "4")
    assert [r["tp"] for r in report["results"]] == [1, 4]
    checks = report["checks"]
    for tp in (1, 4):
        assert checks[f"params_split_tp{tp}"] and checks[f"same_weights_as_tp1_tp{tp}"]
        assert checks[f"greedy_equal_tp{tp}"] and checks[f"one_program_per_shape_tp{tp}"]
    r4 = report["results"][1]
    assert r4["q_proj_shard_shape"] == [128, 2, 16]
    assert len(r4["decode"]["1"]["per_device_ms"]) == 4
    assert set(report["scaling"]["decode_b1"]) == {"1", "4"}
    assert "decode_b1_speedup_tp2" not in checks  # no tp=2 in this run
    d1 = r4["decode"]["1"]
    assert d1["slope_iters"] == [2, 4] and len(d1["step_ms_slope_runs"]) == 1
    assert d1["step_ms_slope"] == d1["step_ms_slope_runs"][0]


@pytest.mark.slow
def test_tp_scaling_bench_alternating_program_copies(tmp_path: pathlib.Path) -> None:
    """--program-copies 2: both copies of each program run, with the same greedy tokens."""
    report = _run_bench(tmp_path, "--tp", "1", "2", "--program-copies", "2")
    assert report["settings"]["program_copies"] == 2
    for r in report["results"]:
        assert r["num_executables"] == 2 * r["num_programs"] == 2 * r["expected_programs"]
    assert report["checks"]["greedy_equal_tp2"]


@pytest.mark.slow
def test_tp_scaling_shard_of_runs_the_shard_at_tp1(tmp_path: pathlib.Path) -> None:
    report = _run_bench(tmp_path, "--tp", "1", "--shard-of", "2", "--slope-iters", "4")
    assert report["settings"]["shard_of"] == 2
    c = report["config"]
    assert (c["num_heads"], c["num_kv_heads"], c["intermediate_size"], c["vocab_size"]) == \
        (4, 1, 128, 256)  # TINY: 8 heads, 2 KV heads, 256, 512
    assert report["checks"]["greedy_equal_tp1"]


def test_tp_scaling_shard_of_refuses_a_size_that_does_not_divide(tmp_path: pathlib.Path) -> None:
    res = subprocess.run([sys.executable, str(BENCH), "--model", "tiny", "--tp", "1",
                          "--shard-of", "3", "--out", str(tmp_path / "x.json")],
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "num_heads=8 is not divisible by 3" in res.stderr
    assert not (tmp_path / "x.json").exists()


def _run_bench(tmp_path: pathlib.Path, *args: str) -> dict:
    out = tmp_path / "tp.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    res = subprocess.run(
        [sys.executable, str(BENCH), "--model", "tiny", *args, "--decode-batches", "1",
         "--context", "20", "--prefill-tokens", "32", "--iters", "2", "--repeats", "1",
         "--spread-steps", "2", "--greedy-steps", "3", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["complete"]
    if len(report["results"]) > 1:  # several tps: one child process each
        assert report["processes"] == "one per tp" and not report["failed"]
    assert report["device"].startswith("cpu") and report["jax"] and report["date"]
    return report
