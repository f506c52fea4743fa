"""The one-direction flow of the design, checked on the source: stages import only what they
stand on, and the exporter never imports the simulator."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "balance_exporter"
# Only the CLI may start the simulator (for `demo` and `simulate`).
SIMULATOR_USERS = {"cli.py"}
FORBIDDEN = {
    # The store and the collector render and hold state; they never do I/O.
    "store.py": {"aiohttp", "balance_exporter.gemini.client", "balance_exporter.server"},
    "metrics.py": {"aiohttp", "balance_exporter.gemini.client", "balance_exporter.scheduler"},
    # The client knows HTTP and signing, not metrics or the store.
    "gemini/client.py": {"prometheus_client", "balance_exporter.store",
                         "balance_exporter.metrics"},
}


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


EXPORTER_MODULES = sorted(
    path for path in PACKAGE.rglob("*.py") if "simulator" not in path.relative_to(PACKAGE).parts
)


@pytest.mark.parametrize("path", EXPORTER_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_exporter_never_imports_the_simulator(path: Path) -> None:
    if path.name in SIMULATOR_USERS:
        return
    assert not any(module.startswith("balance_exporter.simulator")
                   for module in imported_modules(path))


@pytest.mark.parametrize("path", sorted((PACKAGE / "simulator").glob("*.py")),
                         ids=lambda p: p.name)
def test_the_simulator_never_imports_the_exporter(path: Path) -> None:
    assert all(module.startswith("balance_exporter.simulator") or
               not module.startswith("balance_exporter")
               for module in imported_modules(path))


@pytest.mark.parametrize(("relative", "forbidden"), sorted(FORBIDDEN.items()))
def test_stages_do_not_reach_downstream(relative: str, forbidden: set[str]) -> None:
    modules = imported_modules(PACKAGE / relative)
    assert not {m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden)}
