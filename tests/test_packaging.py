"""Every folder with an __init__.py is packaged under the xlaserve namespace."""

from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOP = {"xlaserve": "xlaserve", "runtime": "xlaserve.runtime",
       "pallas_kernels": "xlaserve.pallas_kernels", "sharding": "xlaserve.sharding",
       "checkpoints": "xlaserve.checkpoints", "serve": "xlaserve.serve"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed() -> None:
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in TOP.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    missing = sorted(found - listed)
    stale = sorted(listed - found)
    assert not missing, f"folders with __init__.py not in pyproject packages: {missing}"
    assert not stale, f"pyproject packages without a folder: {stale}"


def test_package_dir_maps_top_level_folders() -> None:
    package_dir = _pyproject()["tool"]["setuptools"]["package-dir"]
    for folder, name in TOP.items():
        assert package_dir.get(name) == folder


def test_subpackages_import_under_xlaserve() -> None:
    import importlib

    for name in TOP.values():
        mod = importlib.import_module(name)
        assert pathlib.Path(mod.__file__).parent.name in TOP  # from this checkout's folders


def test_wheel_contains_every_package(tmp_path) -> None:
    """`pip install .` path: build the wheel and check each package folder's modules are in it."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("xlaserve-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, name in TOP.items():
        for py in (ROOT / folder).rglob("*.py"):
            rel = py.relative_to(ROOT / folder)
            arc = "/".join([*name.split("."), *rel.parts])
            assert arc in names, f"{arc} missing from {wheel.name}"
    assert any(n.endswith("entry_points.txt") for n in names)
