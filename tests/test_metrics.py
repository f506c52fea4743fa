"""The whole exposition for a fixed store state, as /metrics serves it, against golden files
that promtool checks.

Regenerate the golden files after an intended change with UPDATE_GOLDEN=1.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)

from balance_exporter import __version__
from balance_exporter.exposition import ExpositionCache
from tests.helpers import OPENMETRICS_ACCEPT, fixed_store

GOLDEN = Path(__file__).parent / "testdata" / "golden"
FORMATS = {"metrics.prom": "", "metrics.openmetrics": OPENMETRICS_ACCEPT}


async def served(accept: str) -> str:
    """What /metrics serves for the fixed store, without the process families (they vary)."""
    exposition = await ExpositionCache(fixed_store(), process_metrics=False).render(accept, "")
    return exposition.body.decode().replace(f'version="{__version__}"', 'version="VERSION"')


@pytest.mark.parametrize(("golden", "accept"), FORMATS.items())
async def test_exposition_matches_the_golden_file(golden: str, accept: str) -> None:
    rendered = await served(accept)
    if os.environ.get("UPDATE_GOLDEN"):
        (GOLDEN / golden).write_text(rendered)
    assert rendered == (GOLDEN / golden).read_text()


# promtool check metrics reads the text format only (Debian's 2.42 refuses OpenMetrics' `info`
# type); the OpenMetrics file goes through the strict parser below, and the live chain has a
# real Prometheus scrape OpenMetrics.
def test_text_golden_file_passes_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's prometheus package (.ci/run does)")
    result = subprocess.run([promtool, "check", "metrics"],
                            input=(GOLDEN / "metrics.prom").read_bytes(),
                            capture_output=True, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


async def test_stale_reply_values_never_reach_the_exposition() -> None:
    assert "999" not in await served("")


async def test_pending_gauges_only_for_accounts_that_ask_for_them() -> None:
    text = await served("")
    pending = [line for line in text.splitlines() if line.startswith("gemini_balance_pending")]
    assert pending
    assert all('account="treasury-primary"' in line for line in pending)


def test_openmetrics_golden_file_parses_strictly_keeping_counters_and_info() -> None:
    # prometheus_client's OpenMetrics parser rejects what the standard forbids (no # EOF, a
    # sample out of its family, a counter without _total, a duplicate series...).
    text = (GOLDEN / "metrics.openmetrics").read_text()
    families = {family.name: family
                for family in parse_openmetrics(text)}  # type: ignore[no-untyped-call]
    polls = families["gemini_account_polls"]
    assert polls.type == "counter"
    assert [(s.name, s.labels, s.value) for s in polls.samples
            if s.labels["account"] == "savings"] == [
        ("gemini_account_polls_total", {"account": "savings"}, 3.0)]
    assert families["gemini_account"].type == "info"
    assert families["gemini_exporter_build"].samples[0].labels == {"version": "VERSION"}
