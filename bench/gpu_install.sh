# Sourced by the bench/run_gpu_*.sh scripts (repo root, $PY set): installs xlaserve editable on
# the GPU machine. A carried .whl/ (setuptools + wheel) comes first when the machine's setuptools
# is too old for editable installs with package-dir mappings. Returns 1 when the install fails.
gpu_install() {
  if ls .whl/setuptools-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps .whl/setuptools-*.whl .whl/wheel-*.whl
  fi
  $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
}
