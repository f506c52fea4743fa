"""The whole exposition for a fixed store state, against a golden file that promtool checks.

Regenerate the golden file after an intended change with UPDATE_GOLDEN=1.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from balance_exporter import __version__
from balance_exporter.gemini.replies import BalanceReply, CurrencyBalance
from balance_exporter.metrics import BalanceCollector, build_registry
from balance_exporter.store import AccountTarget, BalanceStore

GOLDEN = Path(__file__).parent / "testdata" / "golden" / "metrics.prom"


def fixed_store() -> BalanceStore:
    store = BalanceStore()
    store.configure([
        AccountTarget("treasury-primary", "treasury", "primary", True, 30.0,
                      min_available=(("BTC", 1.0), ("USD", 10000.0)),
                      max_available_drop_ratio=0.5),
        AccountTarget("savings", "savings", None, False, 60.0),
        AccountTarget("never-polled", "treasury", "other", False, 30.0),
    ], ["treasury", "savings"])
    store.record_request("treasury")
    store.record_reply("treasury-primary", BalanceReply((
        CurrencyBalance("BTC", 5.0, 4.5, 4.5, 0.25, 0.0),
        CurrencyBalance("USD", 15000.0, 5000.0, 5000.0, 0.0, 1250.5),
    ), 1_710_547_200_000_000_000, "exchange"), 0.125, 1_710_547_201.5)
    store.record_request("treasury")
    store.record_reply("treasury-primary", BalanceReply((
        CurrencyBalance("BTC", 999.0, 999.0, 999.0, 0.0, 0.0),), 1_710_547_100_000_000_000, None),
        0.25, 1_710_547_230.0)
    store.record_request("savings")
    store.record_reply("savings", BalanceReply((
        CurrencyBalance("USD", 1_000_000.0, 1_000_000.0, 1_000_000.0, 0.0, 0.0),), None, None),
        0.5, 1_710_547_202.0)
    store.record_request("savings")
    store.record_failure("savings", "System", 1.5)
    store.record_request("savings")
    store.record_rate_limited("savings")
    store.record_failure("savings", "RateLimit", 0.75)
    return store


def render_fixed() -> bytes:
    return generate_latest(build_registry(fixed_store(), process_metrics=False))


def test_exposition_matches_the_golden_file() -> None:
    rendered = render_fixed().decode().replace(f'version="{__version__}"', 'version="VERSION"')
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(rendered)
    assert rendered == GOLDEN.read_text()


def test_golden_file_passes_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: install Debian's prometheus package (.ci/run does)")
    result = subprocess.run([promtool, "check", "metrics"], input=GOLDEN.read_bytes(),
                            capture_output=True, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_stale_reply_values_never_reach_the_exposition() -> None:
    assert b"999" not in render_fixed()


def test_pending_gauges_only_for_accounts_that_ask_for_them() -> None:
    text = render_fixed().decode()
    pending = [line for line in text.splitlines() if line.startswith("gemini_balance_pending")]
    assert pending
    assert all('account="treasury-primary"' in line for line in pending)


def test_openmetrics_rendering_is_valid_and_ends_with_eof() -> None:
    registry = build_registry(fixed_store(), process_metrics=False)
    text = generate_openmetrics(registry).decode()  # type: ignore[no-untyped-call]
    assert text.endswith("# EOF\n")
    assert 'gemini_account_polls_total{account="savings"} 3.0' in text


class ExplodingStore(BalanceStore):
    def account_snapshots(self) -> tuple[()]:
        raise RuntimeError("bug")


def test_a_collector_bug_never_fails_the_scrape() -> None:
    collector = BalanceCollector(ExplodingStore())
    names = [family.name for family in collector.collect()]
    # The per-account families are lost for this scrape; the rest is there, and counts it.
    assert names == ["gemini_key_requests", "gemini_key_rate_limited", "gemini_exporter_build",
                     "gemini_exporter_collect_errors"]
    errors = list(collector.collect())[-1]
    assert errors.samples[0].value == 2
