"""SIGTERM: stop accepting, report NOT_SERVING, drain in-flight requests, exit 0 (subprocesses)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import pytest
from xlaserve.serve.client import XlaserveClient

HERE = pathlib.Path(__file__).parent


def _wait_serving(target: str, proc: subprocess.Popen[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with XlaserveClient(target, timeout_s=2) as c:
        while True:
            assert proc.poll() is None, "server exited early"
            try:
                if c.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "server never became SERVING"
            time.sleep(0.1)


def _drain_check(target: str, proc: subprocess.Popen[str]) -> None:
    with XlaserveClient(target, timeout_s=60) as c:
        stream = c.generate_stream("drain this", max_tokens=40, temperature=0.0, ignore_eos=True)
        next(stream)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while c.health() != "NOT_SERVING":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(grpc.RpcError) as info:
            c.generate("too late", max_tokens=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
        assert rest[-1].HasField("final") and rest[-1].final.completion_tokens == 40
    assert proc.wait(timeout=30) == 0


def test_sigterm_drains_then_exits_zero(tmp_path: pathlib.Path) -> None:
    port_file = tmp_path / "port"
    proc = subprocess.Popen([sys.executable, str(HERE / "mock_engine.py"), str(port_file)],
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, text=True)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        target = f"127.0.0.1:{port_file.read_text()}"
        _wait_serving(target, proc, 60)
        _drain_check(target, proc)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_xlaserve_serve_cli_tiny_model() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "xlaserve", "--log-level", "INFO", "serve", "--model",
         "builtin:tiny", "--port", "0", "--metrics-port", "-1", "--max-num-batched-tokens", "64",
         "--max-num-seqs", "16", "--num-pages", "128", "--max-model-len", "256",
         "--dtype", "float32"],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        target = line.split("listening on ")[1].split()[0]
        _wait_serving(target, proc, 300)
        with XlaserveClient(target, timeout_s=60) as c:
            assert c.model_info().model == "tiny"
        _drain_check(target, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
