"""The set-up the README's commands run (scripts/venv.sh): a venv that a failed or foreign
`python3 -m venv` left behind is found and made again, never used half-made."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

VENV_SCRIPT = Path(__file__).parent.parent / "scripts" / "venv.sh"


def in_bash(script: str, folder: Path, path_first: Path) -> subprocess.CompletedProcess[str]:
    """`script` after sourcing venv.sh, in `folder`, with `path_first` first on PATH."""
    env = {**os.environ, "PATH": f"{path_first}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", f"source {VENV_SCRIPT}; {script}"], cwd=folder,
                          env=env, capture_output=True, text=True, check=False, timeout=60)


@pytest.fixture
def this_python(tmp_path: Path) -> Path:
    """A folder whose `python3` is the Python running the tests."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "python3").symlink_to(sys.executable)
    return folder


def fake_python(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_no_venv_is_no_problem(tmp_path: Path, this_python: Path) -> None:
    assert in_bash("venv_problem", tmp_path, this_python).stdout == ""


def test_a_working_venv_of_this_python_is_kept(tmp_path: Path, this_python: Path) -> None:
    (tmp_path / ".venv").symlink_to(sys.prefix)  # the venv the tests run in
    result = in_bash("venv_problem", tmp_path, this_python)
    assert result.stdout == "", result.stderr


def test_a_venv_without_pip_is_unusable(tmp_path: Path, this_python: Path) -> None:
    # What `python3 -m venv` leaves when Debian's python3-venv is missing: a python, no pip.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / ".venv")],
                   check=True, timeout=60)
    result = in_bash("venv_problem", tmp_path, this_python)
    assert "its pip does not work" in result.stdout


def test_a_venv_without_python_is_unusable(tmp_path: Path, this_python: Path) -> None:
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    assert "no .venv/bin/python" in in_bash("venv_problem", tmp_path, this_python).stdout


def test_a_venv_another_python_made_is_unusable(tmp_path: Path, this_python: Path) -> None:
    fake_python(tmp_path / ".venv/bin/python",
                'case "$1" in -m) exit 0;; -c) echo 3.9;; esac')
    result = in_bash("venv_problem", tmp_path, this_python)
    assert "Python 3.9 made it" in result.stdout


def test_a_failed_venv_leaves_nothing_behind_and_says_what_to_install(tmp_path: Path) -> None:
    # A python3 whose venv module fails half-way, as Debian's does without python3-venv.
    fake_python(tmp_path / "bin/python3",
                'case "$1" in -c) exit 0;; -m) mkdir -p .venv/bin; touch .venv/bin/python;'
                ' chmod +x .venv/bin/python; exit 1;; esac')
    result = in_bash("ensure_venv", tmp_path, tmp_path / "bin")
    assert result.returncode == 1
    assert "apt-get install python3-venv" in result.stderr
    assert not (tmp_path / ".venv").exists()


def test_a_half_made_venv_is_removed_and_made_again(tmp_path: Path) -> None:
    fake_python(tmp_path / ".venv/bin/python", "exit 1")  # no working pip
    fake_python(tmp_path / "bin/python3",
                'case "$1" in -c) echo 3.11;; -m) mkdir -p .venv/bin; echo made > .venv/marker;'
                ' exit 1;; esac')
    result = in_bash("ensure_venv", tmp_path, tmp_path / "bin")
    assert ".venv is unusable: its pip does not work" in result.stdout
    assert "making a virtual environment in .venv" in result.stdout


def test_a_python_older_than_3_11_is_refused_by_name(tmp_path: Path) -> None:
    fake_python(tmp_path / "bin/python3", 'case "$1" in -c) exit 1;; -V) echo Python 3.9.2;; esac')
    result = in_bash("ensure_venv", tmp_path, tmp_path / "bin")
    assert result.returncode == 1
    assert "needs Python 3.11 or newer; python3 here is Python 3.9.2" in result.stderr
