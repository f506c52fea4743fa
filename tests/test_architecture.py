"""The one-direction flow of the design, checked on the source: every module of the package has a
rank, and a module imports only modules of its own rank or an earlier one, so a stage reaching
back up the pipeline fails here. The simulator imports nothing of the exporter, and only the demo
imports the simulator."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "balance_exporter"

# Earliest first. Modules of one rank may import each other (the parts of the Gemini stage do).
STAGES: tuple[tuple[str, ...], ...] = (
    # Shared by every stage: the version and the log set-up with its secret redactor.
    ("__init__", "logging", "files", "heap", "slices"),
    # The config, and the one config value the parser is handed (kept free of pydantic).
    ("precision", "config"),
    ("targets",),
    # The Gemini client: signing, nonces, HTTP, typed errors, reply parsing and validation.
    ("gemini", "gemini.signing", "gemini.nonce", "gemini.errors", "gemini.client",
     "gemini.replies", "gemini.stream"),
    # What a page of an account's transfers means, the ledger (the store's memory of each
    # account beyond what is shown) and the store.
    ("transfers", "ledger", "store"),
    # Keeps the store's stamps across restarts.
    ("storage",),
    # Drives the client and writes what it learns into the store; the streams trigger its polls.
    ("scheduler", "streaming"),
    ("metrics",),
    # The sample-line encoder is the exposition's own.
    ("encoding", "exposition"),
    ("webconfig", "server"),
    ("service",),
    ("demo",),
    ("cli", "__main__"),
)
RANK = {module: rank for rank, modules in enumerate(STAGES) for module in modules}
# Beyond the order: the stages that hold or render state do no network I/O, and the client knows
# HTTP and signing, not metrics.
FORBIDDEN_LIBRARIES = {
    **{stage: {"aiohttp"} for stage in ("config", "targets", "transfers", "ledger", "store",
                                         "metrics", "encoding", "exposition")},
    **{stage: {"prometheus_client"} for stage in STAGES[3]},
}
SIMULATOR = "balance_exporter.simulator"
SIMULATOR_USERS = {"demo"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module the file imports, at the top or inside a function."""
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def package_imports(path: Path) -> set[str]:
    """The modules of the exporter package that `path` imports, named as in STAGES."""
    return {module.removeprefix("balance_exporter.") if module != "balance_exporter"
            else "__init__" for module in imported_modules(path)
            if module == "balance_exporter" or module.startswith("balance_exporter.")}


EXPORTER_MODULES = sorted(path for path in PACKAGE.rglob("*.py")
                          if "simulator" not in path.relative_to(PACKAGE).parts)
SIMULATOR_MODULES = sorted((PACKAGE / "simulator").glob("*.py"))


def test_every_exporter_module_has_a_rank() -> None:
    assert sorted({module_name(path) for path in EXPORTER_MODULES} - set(RANK)) == []


@pytest.mark.parametrize("path", EXPORTER_MODULES, ids=module_name)
def test_stages_import_only_earlier_stages(path: Path) -> None:
    name = module_name(path)
    later = {module: RANK.get(module) for module in package_imports(path)
             if not module.startswith("simulator")
             and RANK.get(module, len(STAGES)) > RANK[name]}
    assert later == {}, f"{name} (rank {RANK[name]}) imports later stages {later}"


@pytest.mark.parametrize("path", EXPORTER_MODULES, ids=module_name)
def test_stages_keep_out_of_libraries_that_are_not_their_job(path: Path) -> None:
    forbidden = FORBIDDEN_LIBRARIES.get(module_name(path), set())
    assert not {module for module in imported_modules(path) if module.split(".")[0] in forbidden}


@pytest.mark.parametrize("path", EXPORTER_MODULES, ids=module_name)
def test_only_the_demo_imports_the_simulator(path: Path) -> None:
    uses_simulator = any(module.startswith("simulator") for module in package_imports(path))
    assert not uses_simulator or module_name(path) in SIMULATOR_USERS


@pytest.mark.parametrize("path", SIMULATOR_MODULES, ids=lambda p: p.name)
def test_the_simulator_never_imports_the_exporter(path: Path) -> None:
    assert all(module.startswith(SIMULATOR) or not module.startswith("balance_exporter")
               for module in imported_modules(path))


def test_the_check_catches_a_stage_reaching_back(tmp_path: Path) -> None:
    # The same check on a store that imports the server: it must see the later stage.
    offender = tmp_path / "store.py"
    offender.write_text("from balance_exporter.server import build_app\nimport aiohttp\n")
    assert package_imports(offender) == {"server"}
    assert RANK["server"] > RANK["store"]
