"""`python -m bench.summary RESULT.json ...`: the scrape figures of several runs side by side,
as a Markdown table for docs/benchmarks.md: each run's figure, the median over the runs, and
how far the runs spread (max / min)."""

import json
import statistics
import sys
from pathlib import Path
from typing import Any

# (label, section of the results, figure, unit)
FIGURES = (
    ("P1 ours, gzip, median", "scrape", "unchanged_gzip_median_ms", "ms"),
    ("P1 bare, gzip, median", "scrape", "bare_gzip_median_ms", "ms"),
    ("P1 ours / bare", "scrape", "limit_ratio_gzip", "x"),
    ("P1 ours, gzip, p99", "scrape", "unchanged_gzip_p99_ms", "ms"),
    ("P1 bare, gzip, p99", "scrape", "bare_gzip_p99_ms", "ms"),
    ("P6 ours / bare, plain", "scrape", "limit_ratio_text", "x"),
    ("P5 gzip body / one stream", "scrape", "gzip_size_ratio", "x"),
    ("P2 one account changed, median", "scrape", "incremental_median_ms", "ms"),
    ("P2 one account changed, p99", "scrape", "incremental_p99_ms", "ms"),
    ("P2 loop lag, one account changed", "scrape", "incremental_loop_lag_ms", "ms"),
    ("P2 loop lag, first render", "scrape", "cold_render_loop_lag_ms", "ms"),
    ("P2 one account changed, CPU, median", "scrape", "incremental_cpu_median_ms", "ms"),
    ("P2 one account changed, CPU, p99", "scrape", "incremental_cpu_p99_ms", "ms"),
    ("P1 bare, gzip, CPU, median", "scrape", "bare_gzip_cpu_median_ms", "ms"),
    ("P2 most CPU between two loop turns", "scrape", "incremental_loop_cpu_ms", "ms"),
    ("P2 hypervisor's share of the CPUs", "scrape", "incremental_steal_share", "%"),
    ("P1 ours / bare (204k)", "scrape_treasury", "limit_ratio_gzip", "x"),
    ("P1 ours, gzip, median (204k)", "scrape_treasury", "unchanged_gzip_median_ms", "ms"),
    ("P1 bare, gzip, median (204k)", "scrape_treasury", "bare_gzip_median_ms", "ms"),
    ("P6 ours / bare, plain (204k)", "scrape_treasury", "limit_ratio_text", "x"),
    ("P5 gzip body / one stream (204k)", "scrape_treasury", "gzip_size_ratio", "x"),
    ("P2 one account changed, median (204k)", "scrape_treasury", "incremental_median_ms", "ms"),
    ("P2 one account changed, p99 (204k)", "scrape_treasury", "incremental_p99_ms", "ms"),
    ("P2 loop lag, one account changed (204k)", "scrape_treasury", "incremental_loop_lag_ms",
     "ms"),
    ("P2 loop lag, first render (204k)", "scrape_treasury", "cold_render_loop_lag_ms", "ms"),
    ("P2 one account changed, CPU, median (204k)", "scrape_treasury",
     "incremental_cpu_median_ms", "ms"),
    ("P2 one account changed, CPU, p99 (204k)", "scrape_treasury", "incremental_cpu_p99_ms",
     "ms"),
    ("P1 bare, gzip, CPU, median (204k)", "scrape_treasury", "bare_gzip_cpu_median_ms", "ms"),
    ("P2 most CPU between two loop turns (204k)", "scrape_treasury", "incremental_loop_cpu_ms",
     "ms"),
    ("P2 CPU within the worst loop lag (204k)", "scrape_treasury",
     "incremental_cpu_in_worst_lag_ms", "ms"),
    ("P2 hypervisor's share of the CPUs (204k)", "scrape_treasury", "incremental_steal_share",
     "%"),
    ("P2 under polling, median (204k)", "scrape_polling", "scrape_median_ms", "ms"),
    ("P2 under polling, p99 (204k)", "scrape_polling", "scrape_p99_ms", "ms"),
    ("P2 under polling, loop lag (204k)", "scrape_polling", "loop_lag_ms", "ms"),
    ("P2 under polling, CPU, median (204k)", "scrape_polling", "scrape_cpu_median_ms", "ms"),
    ("P2 under polling, CPU, p99 (204k)", "scrape_polling", "scrape_cpu_p99_ms", "ms"),
    ("P2 under polling, most CPU between two loop turns (204k)", "scrape_polling",
     "loop_cpu_ms", "ms"),
    ("P2 under polling, CPU within the worst loop lag (204k)", "scrape_polling",
     "cpu_in_worst_lag_ms", "ms"),
    ("P2 under polling, hypervisor's share of the CPUs (204k)", "scrape_polling",
     "steal_share", "%"),
    ("P5 under polling, median (204k)", "scrape_polling", "gzip_size_ratio_median", "x"),
    ("P3 RSS at 109k", "memory", "rss_mib", "MiB"),
)


def _value(results: dict[str, Any], section: str, figure: str) -> float | None:
    found = results.get(section, {})
    found = found.get("ours", {}) if section == "memory" else found
    value = found.get(figure)
    return float(value) if isinstance(value, int | float) else None


def table(runs: list[dict[str, Any]]) -> str:
    header = ["figure", *(f"run {n}" for n in range(1, len(runs) + 1)), "median", "spread"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for label, section, figure, unit in FIGURES:
        scale = 100 if unit == "%" else 1  # shares are kept as fractions
        values = [None if (value := _value(run, section, figure)) is None else value * scale
                  for run in runs]
        known = [value for value in values if value is not None]
        if not known:
            continue
        cells = [f"{value:.2f}" if value is not None else "-" for value in values]
        spread = f"{max(known) / min(known):.2f}x" if min(known) > 0 else "-"
        lines.append(f"| {label} ({unit}) | " + " | ".join(cells)
                     + f" | {statistics.median(known):.2f} | {spread} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table([json.loads(Path(path).read_text()) for path in sys.argv[1:]]))
