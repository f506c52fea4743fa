"""P8: the event loop while the plan changes at scale (issue 18, item 13).

- reload: a SIGHUP's work (re-read the config, plan, adopt) with 10,000 accounts on 20 keys,
  every account's interval changed, so every target is new;
- listing: 1,000 discovering keys of 10 accounts each; one account is closed, and the next
  listing of its key plans every key again.
Each against the simulator in a process of its own (so that its work is not on the measured
loop), with the exporter's poll workers running. The figure is the worst lag of a 2 ms timer on
the exporter's loop from a second before the change took effect (the plan being made and
adopted) until two seconds after, beside the worst lag of the same timer in the five seconds
before the change (the machine, the polls and the listings alone).
"""

import asyncio
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from balance_exporter.config import load_config
from balance_exporter.heap import freeze_startup_heap
from balance_exporter.server import ListenAddress, WebOptions
from balance_exporter.service import Service

TICK_SECONDS = 0.002
SECRET = "bench-secret"  # noqa: S105  # the simulator's, not a real one


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _simulator(groups: dict[str, tuple[int, int]], folder: Path,
               ) -> tuple[subprocess.Popen[bytes], str]:
    """The simulator with, per prefix, so many master keys of so many accounts each."""
    names = {f"{prefix}{key}": [f"{prefix}{key}-a{index}" for index in range(accounts)]
             for prefix, (keys, accounts) in groups.items() for key in range(keys)}
    state = {"keys": [{"api_key": f"master-{key}", "api_secret": SECRET, "accounts": group,
                       "rate_limit_per_minute": 100_000} for key, group in names.items()],
             "accounts": [{"name": name, "balances": {"USD": {"amount": "1"}}}
                          for group in names.values() for name in group]}
    (folder / "sim.yml").write_text(yaml.safe_dump(state))
    port = _free_port()
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "balance_exporter", "simulate", "--listen", f"127.0.0.1:{port}",
         "--state", str(folder / "sim.yml"), "--log.level", "error"],
        stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/_sim/state", timeout=5)  # noqa: S310  # loopback
            return process, url
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _key(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "api_key": f"master-{name}", "api_secret": SECRET,
            "requests_per_second": 5, **extra}


async def _ticks(seconds: float, until: Callable[[], bool] = lambda: False,
                 ) -> list[tuple[float, float]]:
    """(when, lag) of a 2 ms timer on the loop, for `seconds` or until `until()` holds."""
    loop = asyncio.get_running_loop()
    ticks = []
    end = loop.time() + seconds
    while loop.time() < end and not until():
        before = loop.time()
        await asyncio.sleep(TICK_SECONDS)
        ticks.append((loop.time(), loop.time() - before - TICK_SECONDS))
    return ticks


def _worst_ms(ticks: list[tuple[float, float]], start: float = -math.inf) -> float:
    return max((lag for at, lag in ticks if at >= start), default=0.0) * 1000


async def _around(change: Callable[[], Awaitable[None]], seen: Callable[[], bool],
                  quick: bool) -> dict[str, float]:
    """The worst lag in the 5 s (quick: 1 s) before the change, and in the second before it was
    seen (the plan being made and adopted) until two seconds after."""
    loop = asyncio.get_running_loop()
    quiet = _worst_ms(await _ticks(1.0 if quick else 5.0))
    started = loop.time()
    changing = asyncio.ensure_future(change())
    ticks = await _ticks(600.0, seen)
    await changing
    seen_at = loop.time()
    ticks += await _ticks(2.0)
    return {"before_ms": quiet, "during_ms": _worst_ms(ticks, max(started, seen_at - 1.0)),
            "change_seconds": seen_at - started}


def _service(path: Path) -> Service:
    """The exporter as its command starts it: the heap made so far frozen before it starts."""
    service = Service(load_config(path), path,
                      WebOptions(listen_address=ListenAddress("127.0.0.1", 0)))
    freeze_startup_heap()
    return service


async def _reload(accounts: int, keys: int, quick: bool, folder: Path, url: str,
                  ) -> dict[str, float]:
    def document(interval: float) -> dict[str, Any]:
        return {"gemini": {"base_url": url}, "keys": [_key(f"r{key}") for key in range(keys)],
                "accounts": [{"key": f"r{key}", "account": f"r{key}-a{index}",
                              "interval_seconds": interval}
                             for key in range(keys) for index in range(accounts // keys)]}
    path = folder / "reload.yml"
    path.write_text(yaml.safe_dump(document(3600)))
    service = _service(path)
    await service.start()
    try:
        await _ticks(300.0, service.store.all_attempted)  # every account polled once
        await asyncio.sleep(2.0)
        path.write_text(yaml.safe_dump(document(3000)))
        reloaded = asyncio.Event()

        async def reload() -> None:
            assert await service.reload()
            reloaded.set()
        return await _around(reload, reloaded.is_set, quick)
    finally:
        await service.stop()


async def _listing(keys: int, accounts: int, quick: bool, folder: Path, url: str,
                   ) -> dict[str, float]:
    discover = {"refresh_seconds": 5 if quick else 30, "defaults": {"interval_seconds": 3600}}
    document = {"gemini": {"base_url": url},
                "keys": [_key(f"l{key}", discover=discover) for key in range(keys)]}
    path = folder / "listing.yml"
    path.write_text(yaml.safe_dump(document))
    service = _service(path)
    await service.start()
    try:
        def every_account_planned() -> bool:
            return len(service.store.account_snapshots()) == keys * accounts
        # Until every account has been polled once (the start's sweep saturates the loop).
        await _ticks(300.0, lambda: every_account_planned() and service.store.all_attempted())
        await asyncio.sleep(2.0)

        async def close_one() -> None:
            request = urllib.request.Request(  # noqa: S310  # loopback
                f"{url}/_sim/accounts/l0-a0", data=json.dumps({"status": "closed"}).encode(),
                method="PATCH", headers={"Content-Type": "application/json"})
            await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
        # Seen when the key has listed again and planned without the account.
        return await _around(close_one, lambda: not every_account_planned(), quick)
    finally:
        await service.stop()


def measure(quick: bool) -> dict[str, dict[str, float]]:
    reload_accounts, reload_keys = (200, 10) if quick else (10_000, 20)
    listing_keys, listing_accounts = (50, 10) if quick else (1000, 10)
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        simulator, url = _simulator({"r": (reload_keys, reload_accounts // reload_keys),
                                     "l": (listing_keys, listing_accounts)}, folder)
        try:
            return {
                "reload": {"accounts": reload_accounts, **asyncio.run(
                    _reload(reload_accounts, reload_keys, quick, folder, url))},
                "listing": {"keys": listing_keys, **asyncio.run(
                    _listing(listing_keys, listing_accounts, quick, folder, url))},
            }
        finally:
            simulator.terminate()
            simulator.wait(timeout=10)
