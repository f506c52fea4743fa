# Sourced by the scripts here: makes .venv if it is missing and installs the package into it,
# with the extras named in $1 (e.g. "[test]"). Leaves the venv's bin/ in $VENV_BIN.
ensure_venv() {
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".${1:-}"
  VENV_BIN=.venv/bin
}
