"""bench/ scripts as modules for tests (bench/ is not a package).

`load(name)` imports bench/<name>.py once per process, the way the scripts run: bench/ on
sys.path for their bench-local imports (rooflines, trace_summary, tp_report, ...), and the
module registered in sys.modules before it executes (dataclasses look their module up)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from typing import Any

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"


def load(name: str) -> Any:
    if name in sys.modules:
        return sys.modules[name]
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
