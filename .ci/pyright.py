"""Type-checks the xlaserve package with pyright, as installed (STYLE.md section 8).

Setuptools maps the top-level folders into the package (`runtime/` is `xlaserve.runtime`, see
`[tool.setuptools] package-dir` in pyproject.toml), and pyright cannot follow that mapping
through an editable install: every `import xlaserve.runtime...` would be unresolved. So this
script copies the sources into a scratch folder laid out as the installed package, runs pyright
there against the current Python environment, and prints the findings with the repository's
paths. Exit status: pyright's (0 when there is no error).

Usage: python .ci/pyright.py [pyright args...]   (needs `pip install pyright`)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dir: dict[str, str] = project["tool"]["setuptools"]["package-dir"]
    python_version = project["tool"]["pyright"]["pythonVersion"]
    with tempfile.TemporaryDirectory(prefix="xlaserve-pyright-") as tmp:
        stage = Path(tmp)
        back: dict[str, str] = {}  # staged folder -> repository folder, for the report
        # Parents before children (xlaserve before xlaserve.runtime), so a child's copy lands
        # inside its parent's.
        for package, folder in sorted(package_dir.items()):
            target = stage.joinpath(*package.split("."))
            shutil.copytree(ROOT / folder, target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            back[str(target)] = str(ROOT / folder)
        (stage / "pyrightconfig.json").write_text(json.dumps({
            "include": ["xlaserve"], "pythonVersion": python_version}))
        run = subprocess.run(["pyright", "--pythonpath", sys.executable, *argv], cwd=stage,
                             capture_output=True, text=True)
        report = run.stdout + run.stderr
        for staged, repo in sorted(back.items(), key=lambda kv: -len(kv[0])):  # deepest first
            report = report.replace(staged + "/", str(Path(repo).relative_to(ROOT)) + "/")
        print(report, end="")
        return run.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
