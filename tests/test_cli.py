"""The console command: --help, version, info."""

from __future__ import annotations

import json
import subprocess
import sys

import xlaserve
from xlaserve.cli import main


def test_version(capsys) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip() == f"xlaserve {xlaserve.__version__}"


def test_info_json(capsys) -> None:
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    import jax

    assert info["jax"] == jax.__version__
    assert info["backend"] == "cpu"
    assert info["attention_implementations"]["reference"] == "available"
    assert len(info["devices"]) == len(jax.devices())


def test_console_script_help() -> None:
    out = subprocess.run([sys.executable, "-m", "xlaserve", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("version", "info"):
        assert cmd in out


def test_unknown_command_exits_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "xlaserve", "no-such-command"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
