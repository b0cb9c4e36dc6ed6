"""runtime/xla_flags.py: defaults added to XLA_FLAGS unless the user set them or opted out."""

import logging

from xlaserve.runtime import xla_flags


def test_adds_missing_defaults_and_keeps_user_values(monkeypatch, caplog):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("XLASERVE_NO_DEFAULT_XLA_FLAGS", raising=False)
    added = xla_flags.apply_defaults()
    assert added == ["--xla_gpu_dot_merger_threshold_mb=512"]
    import os

    flags = os.environ["XLA_FLAGS"]
    assert flags.startswith("--xla_force_host_platform_device_count=8 ")
    assert "--xla_gpu_dot_merger_threshold_mb=512" in flags
    with caplog.at_level(logging.INFO, logger=xla_flags.__name__):
        xla_flags.log_applied()
    assert "xla_gpu_dot_merger_threshold_mb" in caplog.text
    # A user's own value wins and nothing is added twice.
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_dot_merger_threshold_mb=0")
    assert xla_flags.apply_defaults() == []
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_dot_merger_threshold_mb=0"


def test_opt_out(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("XLASERVE_NO_DEFAULT_XLA_FLAGS", "1")
    assert xla_flags.apply_defaults() == []
    import os

    assert os.environ["XLA_FLAGS"] == ""


def test_late_application_is_a_warning(monkeypatch, caplog):
    import jax

    jax.devices()  # a backend exists: flags added now cannot apply
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("XLASERVE_NO_DEFAULT_XLA_FLAGS", raising=False)
    assert xla_flags.apply_defaults()
    with caplog.at_level(logging.WARNING, logger=xla_flags.__name__):
        xla_flags.log_applied()
    assert "do not apply in this process" in caplog.text
