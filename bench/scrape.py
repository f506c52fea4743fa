"""P1, P2, P5 and P6: /metrics latency, ours against prometheus_client's aiohttp handler over the
same store and against the limit (a bare aiohttp handler that only returns the same bytes), all
served on loopback in this process and scraped with one aiohttp connection; the gzipped body's
size against one gzip stream of the same text; and the event loop's lag while we render. Also
the same figures while the store changes as the pollers change it (`measure_polling`)."""

import asyncio
import gzip
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from balance_exporter.exposition import GZIP_LEVEL, ExpositionCache
from balance_exporter.heap import collect_garbage_regularly, freeze_startup_heap
from balance_exporter.metrics import build_registry
from balance_exporter.server import build_app
from bench.workload import make_store, record

GZIP = {"Accept-Encoding": "gzip"}
PLAIN = {"Accept-Encoding": "identity"}
# What Prometheus sends.
PROMETHEUS_ACCEPT = {
    "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    "Accept-Encoding": "gzip",
}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def steal_seconds(stat: Path = Path("/proc/stat")) -> float | None:
    """CPU time the hypervisor gave to others since boot, over all CPUs (Linux's `steal`), or
    None where the kernel does not tell."""
    try:
        fields = stat.read_text().split("\n", 1)[0].split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class StealShare:
    """The share of the machine's CPU time the hypervisor took while running: a virtual
    machine stops for that long, and every wall-clock figure of the run grows with it."""

    _started: tuple[float, float | None] = (0.0, None)

    def start(self) -> None:
        self._started = (time.perf_counter(), steal_seconds())

    def stop(self) -> float | None:
        wall, stolen = time.perf_counter() - self._started[0], steal_seconds()
        if stolen is None or self._started[1] is None or wall <= 0:
            return None
        return (stolen - self._started[1]) / (wall * (os.cpu_count() or 1))


@dataclass
class LoopLag:
    """The largest delay of a 1 ms timer while running: how long the loop was blocked. And the
    most CPU time the loop's thread used between two turns of the timer: how long our code
    held the loop, without the stops of a virtual machine (its thread does not run then)."""

    worst: float = 0.0
    worst_cpu: float = 0.0
    # The CPU time used between the two turns of the worst lag: far below it, the lag was the
    # machine's.
    cpu_in_worst: float = 0.0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected, cpu = loop.time() + 0.001, time.thread_time()
            await asyncio.sleep(0.001)
            lag, used = loop.time() - expected, time.thread_time() - cpu
            if lag > self.worst:
                self.worst, self.cpu_in_worst = lag, used
            self.worst_cpu = max(self.worst_cpu, used)

    def start(self) -> None:
        self.worst = self.worst_cpu = self.cpu_in_worst = 0.0
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> float:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.worst


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"


async def timed_get(http: aiohttp.ClientSession, url: str, headers: dict[str, str],
                    cpu_times: list[float] | None = None) -> float:
    """The scrape's wall-clock time; its CPU time on the loop's thread (ours and the client's:
    one process) goes to `cpu_times`."""
    started, cpu = time.perf_counter(), time.thread_time()
    async with http.get(url, headers=headers) as response:
        await response.read()
        assert response.status == 200
    if cpu_times is not None:
        cpu_times.append(time.thread_time() - cpu)
    return time.perf_counter() - started


async def series(http: aiohttp.ClientSession, url: str, headers: dict[str, str], count: int,
                 before_each: Callable[[], None] | None = None,
                 cpu_times: list[float] | None = None) -> list[float]:
    results = []
    for _ in range(count):
        if before_each is not None:
            before_each()
        results.append(await timed_get(http, url, headers, cpu_times))
    return results


@dataclass
class ScrapeResults:
    series_count: int
    rounds: list[list[float]]          # unchanged scrapes, ours, gzip, per round
    rounds_text: list[float]           # unchanged scrapes, ours, no gzip
    baseline: list[float]              # prometheus_client handler, gzip
    cold_render: float                 # first scrape: every account rendered
    cold_loop_lag: float
    incremental: list[float]           # one account changed before each scrape
    incremental_cpu: list[float]       # their CPU time on the loop's thread
    incremental_loop_lag: float
    incremental_loop_cpu: float        # the most CPU time between two turns of the loop
    incremental_cpu_in_worst_lag: float  # and between the two turns of the worst lag
    incremental_steal: float | None    # the hypervisor's share meanwhile
    unchanged_loop_lag: float
    gzip_bytes: int
    text_bytes: int
    # The limit: a bare handler returning the bytes /metrics returned, gzipped and plain.
    bare_gzip: list[float]
    bare_gzip_cpu: list[float]
    bare_text: list[float]
    # The same text as one gzip stream, at the level the exposition uses.
    one_stream_gzip_bytes: int


def bare_app(gzipped: bytes, text: bytes) -> web.Application:
    """A handler that does nothing but return bytes: what serving /metrics costs at least."""
    async def handler(request: web.Request) -> web.Response:
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=gzipped, headers={"Content-Encoding": "gzip",
                                                       "Content-Type": "text/plain"})
        return web.Response(body=text, headers={"Content-Type": "text/plain"})
    app = web.Application()
    app.router.add_get("/metrics", handler)
    return app


async def run(accounts: int, currencies: int, rounds: int, per_round: int,
              baseline_count: int, incremental_count: int, treasury: bool) -> ScrapeResults:
    freeze_startup_heap()  # as the exporter does before its first poll
    collecting = asyncio.create_task(collect_garbage_regularly())  # and while it runs
    store = make_store(accounts, currencies, treasury)
    cache = ExpositionCache(store)
    ours, ours_url = await serve(build_app(cache))
    baseline_app = web.Application()
    baseline_app.router.add_get("/metrics", make_aiohttp_handler(build_registry(store)))
    theirs, theirs_url = await serve(baseline_app)
    lag = LoopLag()
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            lag.start()
            cold = await timed_get(http, ours_url, PROMETHEUS_ACCEPT)
            cold_lag = await lag.stop()
            await timed_get(http, ours_url, GZIP)  # the text format's first render
            await timed_get(http, ours_url, PLAIN)
            await cache.compacted()  # the steady state: every group in its compacted members
            async with http.get(ours_url, headers=GZIP) as response:
                gzipped = await response.read()
            async with http.get(ours_url, headers=PLAIN) as response:
                assert "Content-Encoding" not in response.headers
                text = await response.read()
            bare, bare_url = await serve(bare_app(gzipped, text))
            bare_gzip: list[float] = []
            bare_gzip_cpu: list[float] = []
            unchanged: list[list[float]] = []
            try:
                # Round by round, the limit and ours: the machine's mood of the moment (another
                # tenant, the CPU's clock) weighs on both alike.
                lag.start()
                for _ in range(rounds):
                    bare_gzip += await series(http, bare_url, GZIP, per_round,
                                              cpu_times=bare_gzip_cpu)
                    unchanged.append(await series(http, ours_url, GZIP, per_round))
                unchanged_lag = await lag.stop()
                bare_text = await series(http, bare_url, PLAIN, per_round)
                unchanged_text = await series(http, ours_url, PLAIN, per_round)
            finally:
                await bare.cleanup()
            baseline = await series(http, theirs_url, GZIP, baseline_count)
            generation = iter(range(1, 1_000_000))
            rng = random.Random(1)

            def change_one_account() -> None:
                record(store, rng.randrange(accounts), next(generation), currencies)

            lag.start()
            steal = StealShare()
            steal.start()
            incremental_cpu: list[float] = []
            incremental = await series(http, ours_url, GZIP, incremental_count,
                                       before_each=change_one_account,
                                       cpu_times=incremental_cpu)
            incremental_steal = steal.stop()
            incremental_lag = await lag.stop()
    finally:
        await ours.cleanup()
        await theirs.cleanup()
        collecting.cancel()
    return ScrapeResults(
        series_count=sum(1 for line in text.splitlines() if not line.startswith(b"#")),
        rounds=unchanged, rounds_text=unchanged_text, baseline=baseline, cold_render=cold,
        cold_loop_lag=cold_lag, incremental=incremental, incremental_cpu=incremental_cpu,
        incremental_loop_lag=incremental_lag, incremental_loop_cpu=lag.worst_cpu,
        incremental_cpu_in_worst_lag=lag.cpu_in_worst,
        incremental_steal=incremental_steal, unchanged_loop_lag=unchanged_lag,
        gzip_bytes=len(gzipped), text_bytes=len(text), bare_gzip=bare_gzip,
        bare_gzip_cpu=bare_gzip_cpu, bare_text=bare_text,
        one_stream_gzip_bytes=len(gzip.compress(text, compresslevel=GZIP_LEVEL, mtime=0)))


def summary(results: ScrapeResults) -> dict[str, float]:
    all_unchanged = [value for round_ in results.rounds for value in round_]
    round_medians = [statistics.median(round_) for round_ in results.rounds]
    return {
        "series": results.series_count,
        "unchanged_gzip_median_ms": statistics.median(all_unchanged) * 1e3,
        "unchanged_gzip_p99_ms": percentile(all_unchanged, 0.99) * 1e3,
        "unchanged_round_median_min_ms": min(round_medians) * 1e3,
        "unchanged_round_median_max_ms": max(round_medians) * 1e3,
        "unchanged_text_median_ms": statistics.median(results.rounds_text) * 1e3,
        "baseline_gzip_median_ms": statistics.median(results.baseline) * 1e3,
        "baseline_gzip_p99_ms": percentile(results.baseline, 0.99) * 1e3,
        "speedup_median": statistics.median(results.baseline) / statistics.median(all_unchanged),
        "cold_render_ms": results.cold_render * 1e3,
        "cold_render_loop_lag_ms": results.cold_loop_lag * 1e3,
        "incremental_median_ms": statistics.median(results.incremental) * 1e3,
        "incremental_p99_ms": percentile(results.incremental, 0.99) * 1e3,
        "incremental_loop_lag_ms": results.incremental_loop_lag * 1e3,
        "incremental_cpu_median_ms": statistics.median(results.incremental_cpu) * 1e3,
        "incremental_cpu_p99_ms": percentile(results.incremental_cpu, 0.99) * 1e3,
        "incremental_loop_cpu_ms": results.incremental_loop_cpu * 1e3,
        "incremental_cpu_in_worst_lag_ms": results.incremental_cpu_in_worst_lag * 1e3,
        **({} if results.incremental_steal is None
           else {"incremental_steal_share": results.incremental_steal}),
        "unchanged_loop_lag_ms": results.unchanged_loop_lag * 1e3,
        "gzip_bytes": results.gzip_bytes,
        "text_bytes": results.text_bytes,
        "bare_gzip_median_ms": statistics.median(results.bare_gzip) * 1e3,
        "bare_gzip_p99_ms": percentile(results.bare_gzip, 0.99) * 1e3,
        "bare_gzip_cpu_median_ms": statistics.median(results.bare_gzip_cpu) * 1e3,
        "bare_text_median_ms": statistics.median(results.bare_text) * 1e3,
        "limit_ratio_gzip": statistics.median(all_unchanged) / statistics.median(
            results.bare_gzip),
        "limit_ratio_text": statistics.median(results.rounds_text) / statistics.median(
            results.bare_text),
        "one_stream_gzip_bytes": results.one_stream_gzip_bytes,
        "gzip_size_ratio": results.gzip_bytes / results.one_stream_gzip_bytes,
    }


def measure(accounts: int, currencies: int, quick: bool, treasury: bool = False
            ) -> dict[str, float]:
    # 200 scrapes after a change: a p99 of fewer is only the worst one.
    counts = (2, 20, 2, 10) if quick else (5, 200, 5, 200)
    rounds, per_round, baseline_count, incremental_count = counts
    return summary(asyncio.run(run(accounts, currencies, rounds, per_round, baseline_count,
                                   incremental_count, treasury)))



# A production-like rhythm: every account polled every 30 s (1,000 accounts: 33 polls a second),
# most polls finding the balances as they were.
POLL_INTERVAL_SECONDS = 30.0
MOVED_SHARE = 0.1


async def run_polling(accounts: int, currencies: int, treasury: bool, duration_seconds: float,
                      scrape_interval_seconds: float) -> dict[str, float]:
    """Scrapes every `scrape_interval_seconds` (gzip, as Prometheus asks) while a poller-like
    task replaces accounts' snapshots at the production rate."""
    freeze_startup_heap()
    collecting = asyncio.create_task(collect_garbage_regularly())
    store = make_store(accounts, currencies, treasury)
    cache = ExpositionCache(store)
    ours, url = await serve(build_app(cache))
    rng = random.Random(2)
    generation = iter(range(1, 10_000_000))
    polled = 0

    async def poll_forever() -> None:
        nonlocal polled
        while True:
            await asyncio.sleep(POLL_INTERVAL_SECONDS / accounts)
            record(store, rng.randrange(accounts), next(generation), currencies,
                   moved=rng.random() < MOVED_SHARE)
            polled += 1

    lag = LoopLag()
    try:
        async with aiohttp.ClientSession(auto_decompress=False) as http:
            await timed_get(http, url, PROMETHEUS_ACCEPT)  # the first full render
            await cache.compacted()
            poller = asyncio.create_task(poll_forever())
            lag.start()
            steal = StealShare()
            steal.start()
            cpu_started, wall_started = time.process_time(), time.perf_counter()
            latencies: list[float] = []
            scrape_cpu: list[float] = []
            sizes: list[int] = []
            while time.perf_counter() - wall_started < duration_seconds:
                await asyncio.sleep(scrape_interval_seconds)
                started, thread_cpu = time.perf_counter(), time.thread_time()
                async with http.get(url, headers=PROMETHEUS_ACCEPT) as response:
                    sizes.append(len(await response.read()))
                latencies.append(time.perf_counter() - started)
                scrape_cpu.append(time.thread_time() - thread_cpu)
            cpu = (time.process_time() - cpu_started) / (time.perf_counter() - wall_started)
            stolen = steal.stop()
            worst_lag = await lag.stop()
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
            async with http.get(url, headers={**PROMETHEUS_ACCEPT, **PLAIN}) as response:
                text = await response.read()
    finally:
        await ours.cleanup()
        collecting.cancel()
    one_stream = len(gzip.compress(text, compresslevel=GZIP_LEVEL, mtime=0))
    return {
        "scrapes": len(latencies), "polls_per_second": polled / duration_seconds,
        "scrape_median_ms": statistics.median(latencies) * 1e3,
        "scrape_p99_ms": percentile(latencies, 0.99) * 1e3,
        "loop_lag_ms": worst_lag * 1e3,
        "scrape_cpu_median_ms": statistics.median(scrape_cpu) * 1e3,
        "scrape_cpu_p99_ms": percentile(scrape_cpu, 0.99) * 1e3,
        "loop_cpu_ms": lag.worst_cpu * 1e3,
        "cpu_in_worst_lag_ms": lag.cpu_in_worst * 1e3,
        **({} if stolen is None else {"steal_share": stolen}),
        "gzip_size_ratio_median": statistics.median(sizes) / one_stream,
        "gzip_size_ratio_worst": max(sizes) / one_stream,
        "cpu_share": cpu,
    }


def measure_polling(accounts: int, currencies: int, quick: bool, treasury: bool = False
                    ) -> dict[str, float]:
    duration, interval = (3.0, 0.5) if quick else (45.0, 0.5)
    return asyncio.run(run_polling(accounts, currencies, treasury, duration, interval))
