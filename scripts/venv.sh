# Sourced by the scripts here: makes .venv if it is missing and installs the package into it,
# with the extras named in $1 (e.g. "[test]"). Leaves the venv's bin/ in $VENV_BIN. Says what it
# is doing: the first run downloads the dependencies and takes a minute or so.
ensure_venv() {
  if [ ! -x .venv/bin/python ]; then
    echo "== making a virtual environment in .venv (python3 -m venv)"
    python3 -m venv .venv || {
      echo "python3 -m venv failed: on Debian/Ubuntu install it with 'apt-get install python3-venv'" >&2
      return 1
    }
  fi
  echo "== installing balance-exporter${1:-} into .venv (pip; the first run takes a minute)"
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".${1:-}"
  VENV_BIN=.venv/bin
}
