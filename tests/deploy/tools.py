"""Finding and running the real tools the deploy kit is checked with."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent.parent
DEPLOY = ROOT / "deploy"
CHART = ROOT / "helm" / "balance-exporter"
GOLDEN = ROOT / "tests" / "testdata" / "golden" / "metrics.prom"


def tool(name: str) -> str:
    """The path of a tool; a missing tool fails the test (scripts/test.sh installs them)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail(f"{name} is not installed; scripts/test.sh and .ci/run install it")
    return found


def run(*args: str, cwd: Path = ROOT, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, input=stdin, capture_output=True, text=True,
                          check=False, timeout=120)


def exported_metric_names() -> set[str]:
    """Every metric name the exporter exposes, from its golden exposition's TYPE lines."""
    return set(re.findall(r"^# TYPE (\S+) ", GOLDEN.read_text(), re.MULTILINE))


def metric_names_in(promql: str) -> set[str]:
    return set(re.findall(r"\bgemini_[a-z_]+", promql))
