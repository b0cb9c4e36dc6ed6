"""bench/trace_summary.py on a small synthetic perfetto trace: busy time, families, gaps."""

from __future__ import annotations

import gzip
import json
import pathlib
from typing import Any

import bench_modules  # tests/
import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "bench"


def _mod() -> Any:
    return bench_modules.load("trace_summary")


@pytest.mark.parametrize("name,family", [
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "collective"),
    ("all_reduce_one_shot_kernel", "collective"),
    ("input_reduce_fusion", "reduce"),
    ("gemm_fusion_dot.12", "gemm"),
    ("ragged_paged_attention_bq4_ppb8_sp2", "attention (pallas)"),
    ("loop_convert_fusion.3", "elementwise"),
    ("something_else", "other"),
])
def test_kernel_family(name: str, family: str) -> None:
    assert _mod().kernel_family(name) == family


def test_summarize_two_steps(tmp_path: pathlib.Path) -> None:
    # One device stream, two steps of: gemm 0-10 us, all-reduce 12-15, gemm 15-25; then a host
    # wait of 500 us before the second step (a large gap), and one host thread.
    ev: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #1"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 9, "args": {"name": "python3"}},
    ]
    for base in (0.0, 525.0):
        ev += [{"ph": "X", "pid": 1, "tid": 7, "name": "gemm_fusion_dot.1", "ts": base, "dur": 10},
               {"ph": "X", "pid": 1, "tid": 7, "name": "ncclDevKernel_AllReduce", "ts": base + 12,
                "dur": 3},
               {"ph": "X", "pid": 1, "tid": 7, "name": "gemm_fusion_dot.2", "ts": base + 15,
                "dur": 10}]
    ev.append({"ph": "X", "pid": 2, "tid": 9, "name": "PjitFunction(step)", "ts": 0, "dur": 40})
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": ev}, f)
    mod = _mod()
    assert mod.find_trace(tmp_path) == path
    out = mod.summarize(path, steps=2)
    dev, host = out["threads"]
    assert dev["device"] and not host["device"]
    assert dev["busy_us_per_step"] == pytest.approx(23.0)
    assert dev["families_us_per_step"] == pytest.approx({"gemm": 20.0, "collective": 3.0})
    assert dev["gaps"]["small_gap_us_per_step"] == pytest.approx(2.0)  # 12 - 10 us, each step
    assert dev["gaps"]["large_gap_us_per_step"] == pytest.approx(250.0)  # 500 us / 2 steps
    pairs = dev["gaps"]["pairs_per_step"]  # which kernels each idle stretch lies between
    assert pairs == [{"pair": "gemm_fusion_dot -> ncclDevKernel_AllReduce", "gap_us": 2.0,
                      "count": 1.0}]
    assert host["busy_us_per_step"] == pytest.approx(20.0)
    assert "collective" in mod.render(out)
    assert "gemm_fusion_dot -> ncclDevKernel_AllReduce" in mod.render(out)


def test_trace_calls_traces_and_summarizes(tmp_path: pathlib.Path) -> None:
    import jax
    import jax.numpy as jnp

    f = jax.jit(lambda x: x * 2 + 1)
    x = jnp.ones((64,))
    out = _mod().trace_calls(lambda: f(x), tmp_path, steps=3)
    assert out["steps"] == 3 and out["threads"]
    assert pathlib.Path(out["trace"]).is_relative_to(tmp_path)
