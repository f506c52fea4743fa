"""`python -m bench [--quick]`: every benchmark, a table on stdout, and JSON in bench/results/.

The targets are those of the performance issue; the machine is described in the JSON.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from bench import hostile, memory, reload, scheduler, scrape, stream

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory_kib / 2**20, 1),
            "python": platform.python_version(), "kernel": platform.release()}


def _share(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1%}"


def rows(results: dict[str, Any]) -> list[tuple[str, str, str, str, str, bool]]:
    """(figure, ours, baseline, ratio, target, met) for the table."""
    s, m, p = results["scrape"], results["memory"], results["scheduler"]
    ours_rss, base_rss = m["ours"]["rss_mib"], m["baseline"]["rss_mib"]
    return [
        ("P1 scrape, unchanged, gzip, p99", f"{s['unchanged_gzip_p99_ms']:.2f} ms",
         f"{s['baseline_gzip_p99_ms']:.0f} ms",
         f"{s['baseline_gzip_p99_ms'] / s['unchanged_gzip_p99_ms']:.0f}x", "<= 5 ms",
         s["unchanged_gzip_p99_ms"] <= 5),
        ("P1 scrape, unchanged, gzip, median", f"{s['unchanged_gzip_median_ms']:.2f} ms",
         f"{s['baseline_gzip_median_ms']:.0f} ms", f"{s['speedup_median']:.0f}x", ">= 200x",
         s["speedup_median"] >= 200),
        ("P1 scrape, unchanged, text, median", f"{s['unchanged_text_median_ms']:.2f} ms", "", "",
         "", True),
        ("P2 scrape after 1 of N accounts changed, p99", f"{s['incremental_p99_ms']:.2f} ms", "",
         "", "<= 10 ms", s["incremental_p99_ms"] <= 10),
        ("P2 loop lag while scraping (worst)",
         f"{max(s['incremental_loop_lag_ms'], s['unchanged_loop_lag_ms']):.1f} ms", "", "",
         "<= 20 ms", max(s["incremental_loop_lag_ms"], s["unchanged_loop_lag_ms"]) <= 20),
        ("P2 loop lag during the first full render", f"{s['cold_render_loop_lag_ms']:.1f} ms",
         f"{s['baseline_gzip_median_ms']:.0f} ms", "", "<= 20 ms",
         s["cold_render_loop_lag_ms"] <= 20),
        *(row for name, figures in (("balances", s), ("treasury", results["scrape_treasury"]))
          for row in (
            (f"P1 limit ({name}, {figures['series'] / 1000:.0f}k series): ours / bare, gzip, "
             "median", f"{figures['unchanged_gzip_median_ms']:.2f} ms",
             f"{figures['bare_gzip_median_ms']:.2f} ms", f"{figures['limit_ratio_gzip']:.2f}x",
             "<= 1.5x", figures["limit_ratio_gzip"] <= 1.5),
            (f"P6 identity ({name}): ours / bare, no gzip, median",
             f"{figures['unchanged_text_median_ms']:.2f} ms",
             f"{figures['bare_text_median_ms']:.2f} ms", f"{figures['limit_ratio_text']:.2f}x",
             "<= 2x", figures["limit_ratio_text"] <= 2),
            (f"P5 size ({name}): gzip body / one stream",
             f"{figures['gzip_bytes'] / 2**20:.2f} MiB",
             f"{figures['one_stream_gzip_bytes'] / 2**20:.2f} MiB",
             f"{figures['gzip_size_ratio']:.2f}x", "<= 1.3x", figures["gzip_size_ratio"] <= 1.3),
          )),
        ("P2 (treasury) scrape after 1 of N accounts changed, p99",
         f"{results['scrape_treasury']['incremental_p99_ms']:.2f} ms", "", "", "<= 10 ms",
         results["scrape_treasury"]["incremental_p99_ms"] <= 10),
        *(row for name, figures in (("", s), (" (treasury)", results["scrape_treasury"]))
          for row in (
            (f"P2{name} its CPU time on the loop's thread, median / p99 (bare: median)",
             f"{figures['incremental_cpu_median_ms']:.2f} / "
             f"{figures['incremental_cpu_p99_ms']:.2f} ms",
             f"{figures['bare_gzip_cpu_median_ms']:.2f} ms", "", "", True),
            (f"P2{name} most CPU time between two loop turns; hypervisor's share",
             f"{figures['incremental_loop_cpu_ms']:.1f} ms",
             _share(figures.get("incremental_steal_share")), "", "", True),
          )),
        *(row for q in (results["scrape_polling"],) for row in (
            (f"P2 (treasury) under polling ({q['polls_per_second']:.0f} polls/s): scrape p99",
             f"{q['scrape_p99_ms']:.2f} ms", f"{q['scrape_median_ms']:.2f} ms median", "",
             "<= 10 ms", q["scrape_p99_ms"] <= 10),
            ("P2 (treasury) under polling: loop lag (worst); CPU time within it",
             f"{q['loop_lag_ms']:.1f} ms", f"{q['cpu_in_worst_lag_ms']:.1f} ms", "", "<= 20 ms",
             q["loop_lag_ms"] <= 20),
            ("P2 (treasury) under polling: scrape CPU p99; most CPU between two loop turns",
             f"{q['scrape_cpu_p99_ms']:.2f} ms", f"{q['loop_cpu_ms']:.1f} ms", "", "", True),
            ("P2 (treasury) under polling: the hypervisor's share of the CPUs",
             _share(q.get("steal_share")), "", "", "", True),
            ("P5 (treasury) under polling: gzip body / one stream, median",
             f"{q['gzip_size_ratio_median']:.2f}x", f"{q['gzip_size_ratio_worst']:.2f}x worst",
             "", "<= 1.3x", q["gzip_size_ratio_median"] <= 1.3),
        )),
        ("P3 RSS after serving every format", f"{ours_rss:.0f} MiB", f"{base_rss:.0f} MiB",
         f"{ours_rss / base_rss:.2f}x", "<= 100 MiB", ours_rss <= 100),
        *(row for name, workload in p.items() for row in (
            (f"P4 {name}: budget used ({workload['accounts']:.0f} accounts, 5 req/s)",
             f"{workload['budget_used']:.1%}", "", "", ">= 95%", workload["budget_used"] >= 0.95),
            (f"P4 {name}: 429 replies / InvalidNonce",
             f"{workload['rate_limited']:.0f} / {workload['invalid_nonce']:.0f}", "", "",
             "0 / 0", workload["rate_limited"] == 0 and workload["invalid_nonce"] == 0),
            (f"P4 {name}: worst data age / planned interval",
             f"{workload['worst_data_age_ratio']:.2f}", "", "", "<= 1.10",
             workload["worst_data_age_ratio"] <= 1.1))),
        *((f"P7 loop lag reading a {name}", f"{figure['worst_loop_lag_ms']:.1f} ms", "", "",
           "<= 20 ms", figure["worst_loop_lag_ms"] <= 20)
          for name, figure in results["hostile"].items()),
        *((f"P8 loop lag (worst) during {what}", f"{figure['during_ms']:.1f} ms",
           f"{figure['before_ms']:.1f} ms before", f"{figure['change_seconds']:.1f} s to adopt",
           "< 100 ms", figure["during_ms"] < 100)
          for what, figure in (
              (f"a reload of {results['reload']['reload']['accounts']:.0f} accounts",
               results["reload"]["reload"]),
              (f"a listing change among {results['reload']['listing']['keys']:.0f} keys",
               results["reload"]["listing"]))),
        ("P11 balance change to /metrics with the stream, p50 / p99",
         f"{results['stream']['stream']['p50_s']:.2f} / "
         f"{results['stream']['stream']['p99_s']:.2f} s",
         f"{results['stream']['polling']['p50_s']:.2f} / "
         f"{results['stream']['polling']['p99_s']:.2f} s polled every "
         f"{results['stream']['polling']['interval_s']:.0f} s", "", "p50 <= 1.5 s",
         results["stream"]["stream"]["p50_s"] <= 1.5),
    ]


def print_table(results: dict[str, Any]) -> None:
    header = ("figure", "ours", "baseline", "ratio", "target", "met")
    table = [header] + [(*row[:5], "yes" if row[5] else "NO") for row in rows(results)]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    s = results["scrape"]
    print(f"\n{s['series']:.0f} series; body {s['text_bytes'] / 2**20:.1f} MiB as text, "
          f"{s['gzip_bytes'] / 2**20:.2f} MiB gzipped; first full render "
          f"{s['cold_render_ms']:.0f} ms; round medians of unchanged scrapes "
          f"{s['unchanged_round_median_min_ms']:.2f}-{s['unchanged_round_median_max_ms']:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and short runs: checks that the suite works")
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--currencies", type=int, default=20)
    parser.add_argument("--json", type=Path,
                        help="write the results here (default: bench/results/)")
    args = parser.parse_args()
    accounts, currencies = (50, 4) if args.quick else (args.accounts, args.currencies)
    results: dict[str, Any] = {"machine": machine(), "quick": args.quick,
                               "accounts": accounts, "currencies": currencies}
    results["scrape"] = scrape.measure(accounts, currencies, args.quick)
    results["scrape_treasury"] = scrape.measure(accounts, currencies, args.quick, treasury=True)
    results["scrape_polling"] = scrape.measure_polling(accounts, currencies, args.quick,
                                                       treasury=True)
    results["memory"] = {way: memory.measure(way, accounts, currencies)
                         for way in ("ours", "baseline")}
    results["scheduler"] = scheduler.measure(args.quick)
    results["hostile"] = hostile.measure(args.quick)
    results["reload"] = reload.measure(args.quick)
    results["stream"] = stream.measure(args.quick)
    results["targets_met"] = all(row[5] for row in rows(results))
    print_table(results)
    if args.json is not None:
        paths = [args.json]
    else:
        RESULTS.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        paths = [RESULTS / f"{stamp}.json", RESULTS / "latest.json"]
    for path in paths:
        path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {paths[0]}")


if __name__ == "__main__":
    main()
