"""xlaserve: a JAX/XLA LLM inference runtime for NVIDIA GPUs with Pallas ragged paged attention.

Public API (imported lazily so that `import xlaserve` stays cheap and never initializes jax):
  xlaserve.LLM            offline generation (runtime/llm.py)
  xlaserve.SamplingParams how to sample (runtime/request.py)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from xlaserve.runtime import xla_flags as _xla_flags

__version__ = "0.1.0"
_xla_flags.apply_defaults()  # before jax makes a backend; see runtime/xla_flags.py

if TYPE_CHECKING:
    from xlaserve.runtime.llm import LLM
    from xlaserve.runtime.request import RequestOutput, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from xlaserve.runtime.llm import LLM

        return LLM
    if name in ("SamplingParams", "RequestOutput"):
        from xlaserve.runtime import request

        return getattr(request, name)
    raise AttributeError(f"module 'xlaserve' has no attribute {name!r}")
