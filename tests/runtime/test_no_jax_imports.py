"""The host-only modules (scheduler, page allocator, requests, outputs) never import jax."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["xlaserve.runtime.scheduler", "xlaserve.runtime.kv_pages",
                                    "xlaserve.runtime.request", "xlaserve.runtime.output",
                                    "xlaserve.runtime.config"])
def test_module_does_not_import_jax(module):
    code = (f"import sys, {module}\n"
            "bad = sorted(m for m in sys.modules\n"
            "             if m == 'jax' or m.startswith(('jax.', 'jaxlib')))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{module} imports jax: {proc.stdout}{proc.stderr}"


def test_the_check_can_fail():
    code = "import sys, xlaserve.runtime.batch; sys.exit(1 if 'jax' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 1
