"""CPU smoke runs of the end-to-end benchmarks (bench/latency.py, bench/throughput.py) on
builtin:tiny with tiny cases, plus checks of the roofline arithmetic on the Llama-3.1-8B shape.

bench/ is not a package: the scripts run as subprocesses (as on the GPU), and e2e_common is
loaded from its path for the arithmetic checks.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import bench_modules  # tests/
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"

COMMON_FIELDS = ("bench", "device", "platform", "jax", "jaxlib", "date_utc", "command",
                 "git_commit", "ceilings", "engine", "cases", "compiles_after_warmup")
ENGINE_FIELDS = ("token_buckets", "seq_buckets", "max_num_batched_tokens", "max_num_seqs",
                 "page_size", "num_pages", "max_model_len", "load_format", "warmup_programs")


def _e2e_common() -> Any:
    return bench_modules.load("e2e_common")


def _run(script: str, out: pathlib.Path, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH / script), "--model", "builtin:tiny", "--out", str(out),
           "--compilation-cache-dir", str(out.parent / "xla_cache"), *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _check_common(rep: dict[str, Any]) -> None:
    for key in COMMON_FIELDS:
        assert key in rep, key
    for key in ENGINE_FIELDS:
        assert key in rep["engine"], key
    assert rep["compiles_after_warmup"] == 0
    assert rep["ceilings"]["measured"] is True
    assert rep["ceilings"]["copy_bytes_per_s"] > 0
    assert rep["ceilings"]["matmul_bf16_flops_per_s"] > 0
    assert rep["engine"]["tokenizer"] is None


@pytest.mark.slow
def test_latency_smoke(tmp_path: pathlib.Path) -> None:
    rep = _run("latency.py", tmp_path / "latency.json", "--contexts", "16,40",
               "--decode-tokens", "4", "--repeats", "2", "--max-num-batched-tokens", "32",
               "--replay-iters", "3")
    _check_common(rep)
    assert rep["engine"]["token_buckets"] == [16, 32]  # only the buckets the cases use
    assert rep["engine"]["seq_buckets"] == [1]
    assert [c["context"] for c in rep["cases"]] == [16, 40]
    for c in rep["cases"]:
        for key in ("decode_ms_per_token", "decode_roofline_ms", "decode_fraction_of_roofline",
                    "ttft_ms", "ttft_roofline_ms", "ttft_fraction_of_roofline",
                    "replay_device_ms", "host_gaps"):
            assert c[key] is not None, key
        assert c["decode_ms_per_token"] > 0 and c["ttft_ms"] > 0
        assert c["decode_roofline"]["bound"] in ("memory", "compute")
    assert rep["cases"][1]["prefill_chunks"] == 2  # 40 tokens in chunks of 32


@pytest.mark.slow
def test_throughput_smoke(tmp_path: pathlib.Path) -> None:
    rep = _run("throughput.py", tmp_path / "throughput.json", "--cases", "16/8:6", "sharegpt:3",
               "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--warmup-prompts", "2")
    _check_common(rep)
    assert rep["engine"]["token_buckets"] == [64] and rep["engine"]["seq_buckets"] == [8]
    fixed, mix = rep["cases"]
    assert fixed["case"] == "16/8" and fixed["num_requests"] == 6
    assert fixed["output_tokens"] == 6 * 8 and fixed["input_tokens"] == 6 * 16
    assert mix["case"] == "sharegpt" and mix["num_requests"] == 3
    for c in rep["cases"]:
        for key in ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s",
                    "roofline_output_tokens_per_s", "fraction_of_roofline"):
            assert c[key] is not None and c[key] > 0, key
        assert c["total_tokens_per_s"] > c["output_tokens_per_s"]


def test_roofline_arithmetic_8b() -> None:
    """Parameter count and decode bytes of the Llama-3.1-8B shape; the issue's context numbers."""
    from xlaserve.runtime.config import ModelConfig

    ec = _e2e_common()
    hf = json.loads((BENCH / "configs" / "llama3.1-8b" / "config.json").read_text())
    cost = ec.ModelCost.from_config(ModelConfig.from_hf_config(hf))
    assert 8.02e9 < cost.total_params < 8.04e9  # Llama-3.1-8B: 8.03 B
    assert cost.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB
    ceilings = {"measured": True, "copy_bytes_per_s": 2.68e12, "matmul_bf16_flops_per_s": 712e12}
    flops, num_bytes = cost.step_cost([1], [1024])
    roof = ec.roofline(flops, num_bytes, ceilings)
    assert roof["bound"] == "memory"
    assert 5.5e-3 < roof["seconds"] < 5.8e-3  # ~15.0 GB of weights + 134 MB of KV at 2.68 TB/s
    flops, num_bytes = cost.step_cost([2048], [2048])  # a 2k prefill: compute bound, ~46 ms
    roof = ec.roofline(flops, num_bytes, ceilings)
    assert roof["bound"] == "compute" and 0.040 < roof["seconds"] < 0.055


def test_sharegpt_lengths_are_fixed() -> None:
    ec = _e2e_common()
    a, b = ec.sharegpt_lengths(50, 0), ec.sharegpt_lengths(50, 0)
    assert a == b and len(a) == 50
    assert all(4 <= i <= 1024 and 4 <= o <= 1024 for i, o in a)
    assert ec.sharegpt_lengths(50, 1) != a


def test_attention_peer_computes_the_same_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/attention.py's jax paged_attention peer (interpreted here) matches our reference.

    jax's kernel applies no softmax scale, so the bench pre-scales q; a peer's time is only
    comparable if it computes the same attention.
    """
    monkeypatch.syspath_prepend(str(BENCH))
    import attention  # bench/attention.py

    monkeypatch.setattr(attention, "INTERPRET", True)
    case = attention.make_case("peer", [1] * 4, [64, 33, 17, 64], seed=3)
    fn, args = attention.jax_paged(case)
    ref = attention.rpa.ragged_paged_attention_reference(*case.args,
                                                         sm_scale=attention.HEAD_DIM ** -0.5)
    assert attention.common.relative_error(fn(*args), ref) < 1e-2


def test_ncu_summary_reads_the_csv_and_relates_dram_bytes_to_the_counted_ones(
        tmp_path: pathlib.Path) -> None:
    ncu = bench_modules.load("attention_ncu")
    head = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream",'
            '"Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit",'
            '"Metric Value"')
    rows = ["==PROF== Disconnected from process 1", head]
    for launch, (dur, read) in enumerate([(100_000, "250,000,000"), (120_000, "250,000,000"),
                                          (110_000, "250,000,000")]):
        for metric, unit, value in (("gpu__time_duration.sum", "ns", f"{dur:,}"),
                                    ("dram__bytes_read.sum", "byte", read)):
            rows.append(f'"{launch}","1","python3","h","ours_kernel","1","7","(128, 1, 1)",'
                        f'"(512, 8, 1)","0","9.0","Command line profiler metrics","{metric}",'
                        f'"{unit}","{value}"')
    path = tmp_path / "ncu.csv"
    path.write_text("\n".join(rows) + "\n")
    out = ncu.summarize(path, {"counted_bytes": 200e6})
    k = out["kernels"]["ours_kernel grid(512, 8, 1)"]
    assert k["launches"] == 3
    assert k["gpu__time_duration.sum"] == 110_000  # the median launch
    assert k["dram_read_TB/s"] == pytest.approx(250e6 / 110e-6 / 1e12)
    assert k["counted_TB/s"] == pytest.approx(200e6 / 110e-6 / 1e12)
    assert k["dram_read_over_counted"] == pytest.approx(1.25)
