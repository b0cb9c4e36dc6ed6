# Sourced by the bench/run_gpu_*.sh scripts (repo root, $PY set).
#   gpu_session DIR [LOG] [NOTE]  makes DIR, copies everything the script prints into DIR/LOG
#                                 (default session.log), prints the date and commit (+ NOTE);
#                                 COMMIT=<hash> overrides the device checkout's (maybe stale) HEAD
#   gpu_install                   installs xlaserve editable on the GPU machine; returns 1 when
#                                 the install fails. A carried .whl/ (setuptools + wheel) comes
#                                 first when the machine's setuptools is too old for editable
#                                 installs with package-dir mappings.
gpu_session() {
  mkdir -p "$1"
  exec > >(tee -a "$1/${2:-session.log}") 2>&1
  # The device's checkout carries the working tree but may keep a stale .git: pass the commit the
  # tree came from as COMMIT=... in the command when it matters (session 5's logs show the stale one).
  echo "date $(date -u +%FT%TZ) commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null) (device checkout HEAD)}${3:+ $3}"
}
gpu_install() {
  if ls .whl/setuptools-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps .whl/setuptools-*.whl .whl/wheel-*.whl
  fi
  $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
}
