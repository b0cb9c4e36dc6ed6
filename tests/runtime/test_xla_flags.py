"""runtime/xla_flags.py: defaults added to XLA_FLAGS unless the user set them or opted out."""

import logging

import pytest

from xlaserve.runtime import xla_flags


@pytest.fixture(autouse=True)
def fresh_state():
    """Each test starts and ends with an empty record (no 'late' or logs leaking to others)."""
    xla_flags.reset_state()
    yield
    xla_flags.reset_state()


def test_adds_missing_defaults_and_keeps_user_values(monkeypatch, caplog):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.delenv("XLASERVE_NO_DEFAULT_XLA_FLAGS", raising=False)
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: (0, 10, 2))  # no versioned flags
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
    assert xla_flags.report()["disabled"] is True


def test_late_application_is_a_warning(monkeypatch, caplog):
    import jax

    jax.devices()  # a backend exists: flags added now cannot apply
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv("XLASERVE_NO_DEFAULT_XLA_FLAGS", raising=False)
    assert xla_flags.apply_defaults()
    with caplog.at_level(logging.WARNING, logger=xla_flags.__name__):
        xla_flags.log_applied()
    assert "do not apply in this process" in caplog.text


def test_versioned_defaults_follow_the_jaxlib_version(monkeypatch, caplog):
    """The tensor-parallel flags exist only in newer XLA (an unknown flag aborts the process):
    added for the measured jaxlib version and later, skipped (and logged) before it."""
    import os

    monkeypatch.delenv("XLASERVE_NO_DEFAULT_XLA_FLAGS", raising=False)
    monkeypatch.delenv("NCCL_PROTO", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: (0, 11, 2))
    added = xla_flags.apply_defaults()
    assert "--xla_gpu_experimental_use_collective_kernels=-ALL_REDUCE" in added
    assert "--xla_gpu_experimental_use_collective_kernels" in os.environ["XLA_FLAGS"]

    # Older jaxlib: only the unversioned default; the others are named in the log as skipped.
    caplog.clear()
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: (0, 10, 2))
    assert xla_flags.apply_defaults() == ["--xla_gpu_dot_merger_threshold_mb=512"]
    with caplog.at_level(logging.INFO, logger=xla_flags.__name__):
        xla_flags.log_applied()
    assert "not set: --xla_gpu_experimental_use_collective_kernels" in caplog.text
    assert "installed 0.10.2" in caplog.text
    # The range is [0.11.2, 0.12): its edges, and a newer jaxlib (the flag might be gone there,
    # which would abort the process).
    for version, inside in (((0, 11, 1), False), ((0, 11, 2), True), ((0, 11, 9), True),
                            ((0, 12), False), ((0, 12, 0), False), ((1, 0, 0), False)):
        monkeypatch.setenv("XLA_FLAGS", "")
        monkeypatch.setattr(xla_flags, "jaxlib_version", lambda v=version: v)
        added = xla_flags.apply_defaults()
        assert ("--xla_gpu_experimental_use_collective_kernels=-ALL_REDUCE" in added) is inside
        assert bool(xla_flags.report()["not_set"]) is not inside


def test_user_environment_wins(monkeypatch):
    import os

    monkeypatch.delenv("XLASERVE_NO_DEFAULT_XLA_FLAGS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_experimental_use_collective_kernels=")
    monkeypatch.setattr(xla_flags, "jaxlib_version", lambda: (0, 11, 3))
    env_default = ("1", ((0, 11, 2), (0, 12)), "test")
    monkeypatch.setitem(xla_flags.ENV_DEFAULTS, "NCCL_TEST_DEFAULT", env_default)
    monkeypatch.setenv("NCCL_TEST_DEFAULT", "0")
    added = xla_flags.apply_defaults()
    assert added == ["--xla_gpu_dot_merger_threshold_mb=512"]
    assert os.environ["NCCL_TEST_DEFAULT"] == "0"
    assert "-ALL_REDUCE" not in os.environ["XLA_FLAGS"]
    # An env default the user did not set is added.
    monkeypatch.delenv("NCCL_TEST_DEFAULT")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert "NCCL_TEST_DEFAULT=1" in xla_flags.apply_defaults()
    assert os.environ["NCCL_TEST_DEFAULT"] == "1"
    xla_flags.log_applied()


@pytest.mark.parametrize("text, want", [("0.11.2", (0, 11, 2)), ("0.11.1rc2", (0, 11, 1)),
                                        ("0.12.0.dev20260101", (0, 12, 0)), ("1.0", (1, 0))])
def test_jaxlib_version_parsing(monkeypatch, text, want):
    monkeypatch.setattr(xla_flags.metadata, "version", lambda _: text)
    assert xla_flags.jaxlib_version() == want


def test_jaxlib_version_is_read_from_metadata():
    import jaxlib

    want = tuple(int(x) for x in jaxlib.__version__.split(".")[:2])
    assert xla_flags.jaxlib_version()[:2] == want
