# Sourced by the scripts here: makes .venv if it is missing or unusable and installs the package
# into it, with the extras named in $1 (e.g. "[test]"). Leaves the venv's bin/ in $VENV_BIN.
# Says what it is doing: the first run downloads the dependencies and takes a minute or so.

MIN_PYTHON=3.11

# What is wrong with .venv, if anything; nothing when it works or does not exist. A venv that a
# failed `python3 -m venv` left half-made (no pip: python3-venv was missing), or that another
# Python made, would break every later run.
venv_problem() {
  [ -e .venv ] || return 0
  if [ ! -x .venv/bin/python ]; then
    echo "it has no .venv/bin/python"
  elif ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "its pip does not work (python3 -m venv did not finish, e.g. without python3-venv)"
  else
    local made_by wanted
    made_by=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
    wanted=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ "$made_by" != "$wanted" ]; then
      echo "Python ${made_by:-unknown} made it, and python3 here is $wanted"
    fi
  fi
}

ensure_venv() {
  if ! command -v python3 >/dev/null 2>&1; then
    echo "python3 is missing: install Python $MIN_PYTHON or newer (Debian/Ubuntu: apt-get install python3 python3-venv)" >&2
    return 1
  fi
  if ! python3 -c "import sys; sys.exit(sys.version_info < (${MIN_PYTHON/./, }))"; then
    echo "balance-exporter needs Python $MIN_PYTHON or newer; python3 here is $(python3 -V 2>&1)" >&2
    return 1
  fi
  local problem
  problem=$(venv_problem)
  if [ -n "$problem" ]; then
    echo "== .venv is unusable: $problem. Removing it and making it again."
    rm -rf .venv
  fi
  if [ ! -e .venv ]; then
    echo "== making a virtual environment in .venv (python3 -m venv)"
    if ! python3 -m venv .venv; then
      rm -rf .venv  # so that the next run starts clean
      echo "python3 -m venv failed: on Debian/Ubuntu install it with 'apt-get install python3-venv', then run this again" >&2
      return 1
    fi
  fi
  echo "== installing balance-exporter${1:-} into .venv (pip; the first run takes a minute)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${1:-}"
  VENV_BIN=.venv/bin
}
