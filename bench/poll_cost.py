"""P9 and P10: what a poll costs against its floor, scrapes while polling, and the idle cost.

Three processes, so that each one's CPU is its own:
- a fake Gemini upstream on loopback (`upstream`), answering /v1/balances with 20 currencies,
  whose values change on every reply or never (its `_timestamp` always moves on);
- the floor (`floor`): a bare client that does what every poll must: build and sign the payload,
  POST it with one aiohttp session at the same rate, read the body, parse it with `Decimal`;
- ours (`ours`): the exporter, 50 keys of 10 accounts each (500 accounts x 20 currencies) at a
  key's rate (10 requests/s: the plan keeps 97 % of that, about 485 polls/s; 1/s: about 49),
  scraped with gzip every 50 ms from this process meanwhile.

Each reports its own process CPU over the measured window divided by its requests: ours / floor
is P9. P10 is the scrapes' p99 (and their count) while ours polls. Two more workloads: the
exporter saturated (150 keys of 10 accounts at 10 requests/s: more polls planned than a core
can make), where the scrapes must still answer and the keys' poll lag shows the polls falling
behind; and idle (every account polled once an hour: after the first polls nothing is due), its
CPU share.
`python -m bench.poll_cost series N` runs the whole measurement N times and gives each figure's
median, least and greatest.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from bench.scrape import percentile

KEYS = 50
ACCOUNTS_PER_KEY = 10
CURRENCIES = 20
RATE_PER_KEY = 10.0
SECRET = "bench-secret-0000"  # noqa: S105  # the fake upstream's, not a real one
# What a child's lines of interest start with (the exporter logs to stdout too).
URL, RESULT = "url: ", "result: "


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# The upstream.

def _rows(generation: int, changing: bool) -> bytes:
    stamp = time.time_ns()
    base = generation if changing else 0
    return json.dumps([
        {"type": "exchange", "currency": f"C{index:02d}", "amount": f"{1000 + base}.123456",
         "available": f"{900 + base}.5", "availableForWithdrawal": f"{900 + base}.5",
         "_timestamp": stamp} for index in range(CURRENCIES)]).encode()


async def upstream(changing: bool) -> None:
    generation = 0

    async def balances(request: web.Request) -> web.Response:
        nonlocal generation
        generation += 1
        return web.Response(body=_rows(generation, changing), content_type="application/json")

    async def roles(request: web.Request) -> web.Response:
        return web.json_response({"isAuditor": True, "isFundManager": False,
                                  "isTrader": False})

    app = web.Application()
    app.add_routes([web.post("/v1/balances", balances), web.post("/v1/roles", roles)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(runner.addresses[0][1], flush=True)  # the port
    await asyncio.Event().wait()


# The floor.

async def floor(url: str, rate: float, warmup: float, window: float) -> dict[str, float]:
    nonce = int(time.time() * 1000)
    sent = 0

    async def one(http: aiohttp.ClientSession) -> None:
        nonlocal nonce, sent
        nonce += 1
        payload = base64.b64encode(json.dumps(
            {"request": "/v1/balances", "nonce": nonce, "account": "a"}).encode())
        signature = hmac.new(SECRET.encode(), payload, hashlib.sha384).hexdigest()
        async with http.post(url + "/v1/balances", headers={
                "X-GEMINI-APIKEY": "master-bench", "X-GEMINI-PAYLOAD": payload.decode(),
                "X-GEMINI-SIGNATURE": signature}) as response:
            body = await response.read()
        json.loads(body, parse_float=Decimal, parse_int=Decimal)
        sent += 1

    async with aiohttp.ClientSession() as http:
        tasks: set[asyncio.Task[None]] = set()
        started = time.monotonic()
        measured_from, cpu_from, sent_from = started + warmup, 0.0, 0
        index = 0
        while True:
            now = time.monotonic()
            if cpu_from == 0.0 and now >= measured_from:
                cpu_from, sent_from = _cpu_seconds(), sent
            if now >= measured_from + window:
                break
            index += 1
            await asyncio.sleep(max(0.0, started + index / rate - now))
            task = asyncio.create_task(one(http))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        cpu, requests = _cpu_seconds() - cpu_from, sent - sent_from
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"requests_per_second": requests / window, "cpu_per_request_ms": cpu / requests * 1e3,
            "cpu_share": cpu / window}


# Ours.

def ours_document(base_url: str, rate_per_key: float = RATE_PER_KEY,
                  interval_seconds: float | None = None, keys_count: int = KEYS,
                  ) -> dict[str, Any]:
    """The exporter's config: each key's accounts at `interval_seconds`, by default as often as
    the key's rate allows."""
    keys, accounts = [], []
    for key in range(keys_count):
        keys.append({"name": f"k{key:02d}", "api_key": f"master-bench{key:02d}",
                     "api_secret": SECRET, "requests_per_second": rate_per_key})
        accounts += [{"key": f"k{key:02d}", "account": f"a{key:02d}x{account}",
                      "interval_seconds": interval_seconds or ACCOUNTS_PER_KEY / rate_per_key}
                     for account in range(ACCOUNTS_PER_KEY)]
    return {"gemini": {"base_url": base_url}, "keys": keys, "accounts": accounts,
            "precision": {f"C{index:02d}": 6 for index in range(CURRENCIES)}}


async def ours(base_url: str, warmup: float, window: float, rate_per_key: float,
               interval_seconds: float | None, keys_count: int) -> dict[str, float]:
    from balance_exporter.config import load_config
    from balance_exporter.server import ListenAddress, WebOptions
    from balance_exporter.service import Service

    with TemporaryDirectory() as directory:
        path = Path(directory) / "exporter.yml"
        path.write_text(yaml.safe_dump(ours_document(base_url, rate_per_key, interval_seconds,
                                                     keys_count)))
        service = Service(load_config(path), path,
                          WebOptions(listen_address=ListenAddress("127.0.0.1", 0)))
        await service.start()
        print(f"{URL}{service.url}", flush=True)

        def polls() -> int:
            return sum(snapshot.balances.polls for snapshot in service.store.account_snapshots())
        try:
            await asyncio.sleep(warmup)
            cpu_from, polls_from = _cpu_seconds(), polls()
            await asyncio.sleep(window)
            cpu, polled = _cpu_seconds() - cpu_from, polls() - polls_from
            lag = max((key.poll_lag_seconds or 0.0 for key in service.store.key_counters()),
                      default=0.0)
        finally:
            await service.stop()
    return {"polls_per_second": polled / window,
            "cpu_per_poll_ms": cpu / polled * 1e3 if polled else 0.0,
            "cpu_share": cpu / window, "poll_lag_max_seconds": lag}


# The driver.

def _line(child: "subprocess.Popen[str]", prefix: str) -> str:
    """The rest of the child's first line that starts with `prefix`."""
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise RuntimeError(f"the child {child.args!r} ended ({child.wait()}) without a {prefix!r} "
                       "line")


def _child(*args: str) -> "subprocess.Popen[str]":
    return subprocess.Popen(  # noqa: S603  # this module, with its own arguments
        [sys.executable, "-m", "bench.poll_cost", *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


async def _scrape_while(url: str, child: "subprocess.Popen[str]", warmup: float,
                        every_seconds: float) -> list[float]:
    """Gzipped scrapes every `every_seconds` until the exporter stops: the latencies past the
    warm-up."""
    latencies = []
    measured_from = time.perf_counter() + warmup
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        while child.poll() is None:
            started = time.perf_counter()
            try:
                async with http.get(url + "/metrics", headers={
                        "Accept-Encoding": "gzip"}) as response:
                    await response.read()
            except aiohttp.ClientError:
                break  # the exporter stopped at the end of its window
            if started >= measured_from:
                latencies.append(time.perf_counter() - started)
            # Woken early when the exporter ends, not a whole interval later.
            for _ in range(max(1, round(every_seconds / 0.05))):
                if child.poll() is not None:
                    break
                await asyncio.sleep(min(every_seconds, 0.05))
    return latencies


@dataclass(frozen=True)
class Workload:
    changing: bool
    rate_per_key: float
    interval_seconds: float | None = None  # None: as often as the key's rate allows
    floor: bool = True  # measure the bare client at ours' rate beside it
    scrape_every_seconds: float = 0.05
    keys: int = KEYS


WORKLOADS = {
    "changing_500": Workload(changing=True, rate_per_key=RATE_PER_KEY),
    "unchanged_500": Workload(changing=False, rate_per_key=RATE_PER_KEY),
    "changing_50": Workload(changing=True, rate_per_key=1.0),
    "unchanged_50": Workload(changing=False, rate_per_key=1.0),
    # More polls planned than a core makes (150 keys at Gemini's 10 requests/s, 1,500 accounts):
    # the scrapes still answer, the polls fall behind.
    "saturated": Workload(changing=True, rate_per_key=RATE_PER_KEY, floor=False, keys=150),
    # Every account polled once an hour: after the first polls nothing is due; scraped as
    # Prometheus does, every 15 s.
    "idle": Workload(changing=False, rate_per_key=RATE_PER_KEY, interval_seconds=3600.0,
                     floor=False, scrape_every_seconds=15.0),
}


def run(workload: Workload, warmup: float, window: float) -> dict[str, float]:
    server = _child("upstream", "changing" if workload.changing else "unchanged")
    try:
        assert server.stdout is not None
        base_url = f"http://127.0.0.1:{int(server.stdout.readline())}"
        exporter = _child("ours", base_url, str(warmup), str(window), str(workload.rate_per_key),
                          str(workload.interval_seconds or 0.0), str(workload.keys))
        url = _line(exporter, URL)
        results: list[str] = []

        async def scraped_while_polling() -> list[float]:
            # The exporter's lines are read meanwhile: a full pipe would stop it.
            reading = asyncio.create_task(asyncio.to_thread(_line, exporter, RESULT))
            latencies = await _scrape_while(url, exporter, warmup, workload.scrape_every_seconds)
            results.append(await reading)
            return latencies
        measured = asyncio.run(scraped_while_polling())
        exporter.wait()
        figures = {f"ours_{name}": value for name, value in json.loads(results[0]).items()}
        if workload.floor:
            rate = figures["ours_polls_per_second"]
            bare = _child("floor", base_url, str(rate), str(warmup), str(window))
            floor_figures = json.loads(_line(bare, RESULT))
            bare.wait()
            figures |= {f"floor_{name}": value for name, value in floor_figures.items()}
            figures["ratio"] = (figures["ours_cpu_per_poll_ms"]
                                / floor_figures["cpu_per_request_ms"])
    finally:
        server.terminate()
        server.wait()
    return figures | {
        "scrapes": len(measured),
        "scrape_gzip_p99_ms": percentile(measured, 0.99) * 1e3 if measured else 0.0,
        "scrape_gzip_median_ms": statistics.median(measured) * 1e3 if measured else 0.0,
        "scrape_gzip_max_ms": max(measured) * 1e3 if measured else 0.0,
    }


def measure(quick: bool, names: list[str] | None = None) -> dict[str, dict[str, float]]:
    warmup, window = (3.0, 3.0) if quick else (8.0, 20.0)
    return {name: run(WORKLOADS[name], warmup, window) for name in names or WORKLOADS}


def series(runs: int, quick: bool) -> dict[str, dict[str, dict[str, float]]]:
    """Each figure's median, least and greatest over `runs` whole measurements."""
    measured = [measure(quick) for _ in range(runs)]
    return {name: {figure: {"median": statistics.median(run[name][figure] for run in measured),
                            "min": min(run[name][figure] for run in measured),
                            "max": max(run[name][figure] for run in measured)}
                   for figure in measured[0][name]}
            for name in WORKLOADS}


def main() -> None:
    role, *args = sys.argv[1:]
    if role == "upstream":
        asyncio.run(upstream(args[0] == "changing"))
    elif role == "floor":
        figures = asyncio.run(floor(args[0], float(args[1]), float(args[2]), float(args[3])))
        print(f"{RESULT}{json.dumps(figures)}", flush=True)
    elif role == "ours":
        figures = asyncio.run(ours(args[0], float(args[1]), float(args[2]), float(args[3]),
                                   float(args[4]) or None, int(args[5])))
        print(f"{RESULT}{json.dumps(figures)}", flush=True)
    elif role == "series":
        print(json.dumps(series(int(args[0]), "--quick" in args), indent=1))
    else:  # measure [--quick] [workload ...]
        names = [arg for arg in args if arg in WORKLOADS]
        print(json.dumps(measure("--quick" in args, names), indent=1))


if __name__ == "__main__":
    main()
