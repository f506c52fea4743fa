"""The benchmark suite runs end to end (at small sizes) and reports every figure. Its numbers
are not asserted here: timings belong to bench/, not to the tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.scrape import steal_seconds

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_quick_bench_reports_every_figure(tmp_path: Path) -> None:
    output = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(output)],
                            cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "P1 scrape, unchanged, gzip, p99" in result.stdout
    results = json.loads(output.read_text())
    assert set(results) >= {"machine", "scrape", "memory", "scheduler", "targets_met"}
    assert results["scrape"]["series"] > 0
    assert results["scrape"]["baseline_gzip_median_ms"] > 0
    assert set(results["memory"]) == {"ours", "baseline"}
    assert {workload: figures["requests"] > 0 for workload, figures
            in results["scheduler"].items()} == {"balances": True, "mixed": True}
    assert "P4 mixed: worst data age / planned interval" in result.stdout
    assert "P8 loop lag (worst) during a reload of 200 accounts" in result.stdout
    assert {figures["change_seconds"] > 0 for figures in results["reload"].values()} == {True}
    assert {figure["hostile_replies"] for name, figure in results["hostile"].items()
            if "under the cap" not in name} != {0}  # the hostile replies did arrive
    assert "P7 loop lag reading a gzip bomb (1 GB)" in result.stdout
    assert results["scrape_polling"]["scrapes"] > 0
    assert results["scrape_polling"]["polls_per_second"] > 0  # the store did change meanwhile
    assert "P2 (treasury) under polling" in result.stdout
    assert "P11 balance change to /metrics with the stream, p50 / p99" in result.stdout
    assert results["stream"]["stream"]["changes"] == 10
    assert results["stream"]["polling"]["p50_s"] > 0
    # The figures that tell our code's cost from a virtual machine's stops.
    assert {"incremental_cpu_p99_ms", "incremental_loop_cpu_ms", "bare_gzip_cpu_median_ms"} <= set(
        results["scrape_treasury"])
    assert {"scrape_cpu_p99_ms", "loop_cpu_ms", "cpu_in_worst_lag_ms"} <= set(
        results["scrape_polling"])
    summary = subprocess.run([sys.executable, "-m", "bench.summary", str(output), str(output)],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "| P2 under polling, p99 (204k) (ms) |" in summary
    assert "1.00x |" in summary  # one run twice: no spread


def test_steal_is_read_from_the_kernels_cpu_line(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  883287 0 97165 4303549 10831 0 15684 220116 0 0\n"
                    "cpu0 441643 0 48582 2151774 5415 0 7842 110058 0 0\n")
    assert steal_seconds(stat) == 220116 / os.sysconf("SC_CLK_TCK")
    stat.write_text("cpu  883287 0 97165\n")  # an old kernel: no steal field
    assert steal_seconds(stat) is None
    assert steal_seconds(tmp_path / "missing") is None


def test_the_poll_cost_bench_reports_ours_the_floor_the_scrapes_and_the_idle_share() -> None:
    result = subprocess.run([sys.executable, "-m", "bench.poll_cost", "measure", "--quick",
                             "changing_500", "idle"],
                            cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads(result.stdout[result.stdout.index("{"):])
    assert set(figures) == {"changing_500", "idle"}
    polling = figures["changing_500"]
    assert polling["ours_polls_per_second"] > 100
    assert polling["ours_cpu_per_poll_ms"] > 0
    assert polling["floor_cpu_per_request_ms"] > 0
    assert polling["ratio"] > 0
    assert polling["scrapes"] > 0
    # Idle: every account was polled once in the warm-up, none in the window.
    assert figures["idle"]["ours_polls_per_second"] == 0
    assert 0 <= figures["idle"]["ours_cpu_share"] < 1
    assert "floor_cpu_per_request_ms" not in figures["idle"]
