"""The base of the kernel test classes: each runs compiled on a GPU (skipping elsewhere), and a
subclass with INTERPRET = True runs the same tests through the Pallas interpreter on CPU (CI)."""

from __future__ import annotations

import jax
import pytest


class CompiledOrInterpreted:
    """Compiled kernel vs reference; skips without a GPU. The subclass interprets on CPU."""

    INTERPRET = False

    @pytest.fixture(autouse=True)
    def _need_backend(self):
        if not self.INTERPRET and jax.default_backend() != "gpu":
            pytest.skip("compiled Pallas Triton kernel needs an NVIDIA GPU")
