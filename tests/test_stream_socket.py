"""The balances@account stream against the simulator's WebSocket endpoint over real sockets: a
change shows within 2 s while the regular interval is a minute, every fault leaves REST polling
going and the stream coming back, a flood stays inside the budget, and a frame never lets a
stale REST reply in."""

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from balance_exporter.cli import config_summary
from balance_exporter.config import load_config
from balance_exporter.gemini import stream
from balance_exporter.service import Service
from balance_exporter.simulator.server import RunningSimulator, start_simulator
from balance_exporter.simulator.state import SimState
from tests.helpers import (
    ACCOUNT_KEY,
    ACCOUNT_SECRET,
    MASTER_KEY,
    MASTER_SECRET,
    Samples,
    add_fault,
    running_exporter,
    sample,
    scrape_until,
    sim_call,
    simulator_document,
    write_config,
)


@pytest.fixture
async def world() -> AsyncIterator[RunningSimulator]:
    document = simulator_document()
    document["keys"][1]["nonce"] = "seconds"
    document["accounts"][3]["timestamp_format"] = "ns"  # stamped: a stale reply shows as such
    running = await start_simulator(SimState.from_document(document))
    yield running
    await running.close()


def streaming_document(simulator: RunningSimulator, interval: float) -> dict[str, Any]:
    return {
        "gemini": {"base_url": simulator.url, "websocket_url": simulator.websocket_url,
                   "timeout_seconds": 2},
        "keys": [{"name": "hot", "api_key": ACCOUNT_KEY, "api_secret": ACCOUNT_SECRET,
                  "nonce": "seconds", "requests_per_second": 1,
                  "stream": {"reconcile_interval_seconds": 120}}],
        "accounts": [{"key": "hot", "name": "delta", "interval_seconds": interval}],
        "polling": {"max_backoff_seconds": 2, "rejected_retry_seconds": 2},
    }


async def streaming(simulator: RunningSimulator, tmp_path: Path,
                    interval: float) -> AsyncIterator[Service]:
    path = tmp_path / "exporter.yml"
    write_config(path, streaming_document(simulator, interval))
    async with running_exporter(path) as service:
        yield service


@pytest.fixture
async def exporter(world: RunningSimulator, tmp_path: Path) -> AsyncIterator[Service]:
    async for service in streaming(world, tmp_path, 60):
        yield service


@pytest.fixture
async def faulted(world: RunningSimulator, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Service]:
    """Faster pings and a 15 s regular interval: a dead connection is seen in seconds, and
    the polls going on meanwhile show."""
    monkeypatch.setattr(stream, "TIMING", stream.StreamTiming(
        ping_seconds=1, pong_seconds=1, idle_seconds=3, subscribe_seconds=2))
    async for service in streaming(world, tmp_path, 15):
        yield service


def stream_up(samples: Samples) -> bool:
    return sample(samples, "gemini_stream_up", key="hot") == 1


def polled(samples: Samples) -> bool:
    return stream_up(samples) and sample(samples, "gemini_account_up", account="delta") == 1


def shows(amount: str) -> Callable[[Samples], bool]:
    return lambda samples: usd(samples) == float(amount)


def usd(samples: Samples) -> float | None:
    return sample(samples, "gemini_balance_amount", account="delta", currency="USD")


async def set_usd(http: aiohttp.ClientSession, simulator: RunningSimulator, amount: str) -> None:
    await sim_call(http, "PUT", f"{simulator.url}/_sim/accounts/delta/balances",
                   {"USD": {"amount": amount}})


async def stream_fault(http: aiohttp.ClientSession, simulator: RunningSimulator,
                       kind: str) -> None:
    await sim_call(http, "POST", f"{simulator.url}/_sim/stream/faults", {"kind": kind})


async def test_a_change_shows_at_once_while_the_interval_is_a_minute(
    http: aiohttp.ClientSession, world: RunningSimulator, exporter: Service,
) -> None:
    samples = await scrape_until(http, exporter.url, "the stream", polled)
    polls = sample(samples, "gemini_account_polls_total", account="delta") or 0
    # The regular poll is two minutes away (the reconcile interval): a change that shows within
    # the wait came through the stream (how fast is bench P11's figure, not a test's).
    for amount in ("1234.56", "2345.67", "3456.78"):
        await set_usd(http, world, amount)
        samples = await scrape_until(http, exporter.url, f"USD {amount}", shows(amount))
    assert (sample(samples, "gemini_account_polls_total", account="delta") or 0) <= polls + 3
    # Each change's frame made a poll due, unless one was due already (the subscription's).
    assert 2 <= (sample(samples, "gemini_stream_triggered_polls_total", key="hot") or 0) <= 3
    assert sample(samples, "gemini_account_last_update_timestamp_seconds",
                  account="delta") == pytest.approx(time.time(), abs=5)
    # While the stream is up, the regular interval is the reconcile one (120 s, not 60 s).
    assert sample(samples, "gemini_account_poll_interval_seconds", account="delta") == 120
    page = await (await http.get(exporter.url + "/")).text()
    assert "Key hot: stream up" in page


async def test_a_stale_rest_reply_after_a_frame_is_still_ignored(
    http: aiohttp.ClientSession, world: RunningSimulator, exporter: Service,
) -> None:
    await scrape_until(http, exporter.url, "the stream", polled)
    await add_fault(http, world, "delta", {"kind": "stale", "count": 1})
    await set_usd(http, world, "777.77")
    samples = await scrape_until(http, exporter.url, "the stale reply", lambda s: sample(
        s, "gemini_account_stale_replies_total", account="delta") == 1)
    assert usd(samples) != 777.77 + 1_000_000
    await set_usd(http, world, "888.88")
    await scrape_until(http, exporter.url, "a fresh one", lambda s: usd(s) == 888.88)


@pytest.mark.parametrize(("kind", "reason"), [
    ("drop", "closed"), ("silent", "pong_timeout"), ("huge", "frame_too_large")])
async def test_the_stream_comes_back_after_a_fault_and_rest_goes_on(
    http: aiohttp.ClientSession, world: RunningSimulator, faulted: Service, kind: str,
    reason: str,
) -> None:
    samples = await scrape_until(http, faulted.url, "the stream", stream_up)
    polls = sample(samples, "gemini_account_polls_total", account="delta") or 0
    await stream_fault(http, world, kind)
    samples = await scrape_until(http, faulted.url, f"the {kind} fault seen", lambda s: sample(
        s, "gemini_stream_errors_total", key="hot", reason=reason))
    samples = await scrape_until(http, faulted.url, "the stream back", lambda s: stream_up(s)
                                 and sample(s, "gemini_stream_connects_total", key="hot") == 2,
                                 limit_seconds=20)
    await set_usd(http, world, "4321.00")
    samples = await scrape_until(http, faulted.url, "a change after it",
                                 lambda s: usd(s) == 4321.0)
    # REST polling went on (at least the poll at each subscription and the change's).
    assert (sample(samples, "gemini_account_polls_total", account="delta") or 0) > polls + 1


async def test_a_connection_with_no_message_at_all_is_closed_and_opened_again(
    http: aiohttp.ClientSession, world: RunningSimulator, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Pings too far apart to matter: the silence alone ends the connection.
    monkeypatch.setattr(stream, "TIMING", stream.StreamTiming(
        ping_seconds=100, pong_seconds=100, idle_seconds=2, subscribe_seconds=2))
    async for service in streaming(world, tmp_path, 15):
        await scrape_until(http, service.url, "the stream", stream_up)
        await stream_fault(http, world, "silent")
        samples = await scrape_until(http, service.url, "the silence seen", lambda s: sample(
            s, "gemini_stream_errors_total", key="hot", reason="idle_timeout"))
        assert sample(samples, "gemini_stream_errors_total", key="hot",
                      reason="pong_timeout") is None
        await scrape_until(http, service.url, "the stream back", lambda s: stream_up(s) and sample(
            s, "gemini_stream_connects_total", key="hot") == 2, limit_seconds=20)


@pytest.mark.parametrize(("size", "closed"), [(stream.MAX_MESSAGE_BYTES, False),
                                             (stream.MAX_MESSAGE_BYTES + 1, True)])
async def test_a_message_past_1_mib_closes_the_connection_and_one_of_1_mib_does_not(
    http: aiohttp.ClientSession, world: RunningSimulator, faulted: Service, size: int,
    closed: bool,
) -> None:
    await scrape_until(http, faulted.url, "the stream", stream_up)
    await sim_call(http, "POST", f"{world.url}/_sim/stream/faults",
                   {"kind": "huge", "size_bytes": size})
    await set_usd(http, world, "1.25")  # a frame after it: read on the same connection or not
    samples = await scrape_until(http, faulted.url, "the change", lambda s: usd(s) == 1.25)
    if closed:
        samples = await scrape_until(http, faulted.url, "a new connection", lambda s: sample(
            s, "gemini_stream_errors_total", key="hot", reason="frame_too_large") == 1
            and sample(s, "gemini_stream_connects_total", key="hot") == 2, limit_seconds=20)
    else:
        assert sample(samples, "gemini_stream_errors_total", key="hot",
                      reason="frame_too_large") is None
        assert sample(samples, "gemini_stream_connects_total", key="hot") == 1


async def test_a_garbage_frame_is_counted_and_triggers_nothing(
    http: aiohttp.ClientSession, world: RunningSimulator, faulted: Service,
) -> None:
    samples = await scrape_until(http, faulted.url, "the stream", stream_up)
    triggered = sample(samples, "gemini_stream_triggered_polls_total", key="hot")
    await stream_fault(http, world, "garbage")
    samples = await scrape_until(http, faulted.url, "the garbage", lambda s: sample(
        s, "gemini_stream_errors_total", key="hot", reason="malformed_frame") == 1)
    assert sample(samples, "gemini_stream_triggered_polls_total", key="hot") == triggered
    assert stream_up(samples)


async def test_a_rejected_upgrade_backs_off_and_rest_goes_on(
    http: aiohttp.ClientSession, world: RunningSimulator, faulted: Service,
) -> None:
    await scrape_until(http, faulted.url, "the stream", stream_up)
    await stream_fault(http, world, "reject_next")
    await stream_fault(http, world, "drop")
    samples = await scrape_until(http, faulted.url, "the rejection", lambda s: sample(
        s, "gemini_stream_errors_total", key="hot", reason="rejected") == 1)
    await scrape_until(http, faulted.url, "the stream back", stream_up, limit_seconds=20)
    assert sample(samples, "gemini_account_up", account="delta") == 1


async def test_a_flood_of_frames_never_exceeds_the_budget(
    http: aiohttp.ClientSession, world: RunningSimulator, exporter: Service,
) -> None:
    samples = await scrape_until(http, exporter.url, "the stream", stream_up)
    requests = sample(samples, "gemini_key_requests_total", key="hot") or 0
    started = time.monotonic()
    await stream_fault(http, world, "flood")
    samples = await scrape_until(http, exporter.url, "the flood", lambda s: (sample(
        s, "gemini_stream_frames_total", key="hot") or 0) >= 1000, limit_seconds=20)
    elapsed = time.monotonic() - started
    sent = (sample(samples, "gemini_key_requests_total", key="hot") or 0) - requests
    # One request a second is the key's budget: the flood made polls due, never faster.
    assert sent <= elapsed * 1 + 2
    state = await (await http.get(f"{world.url}/_sim/state")).json()
    assert state["keys"][ACCOUNT_KEY].get("rate_limited", 0) == 0
    assert state["keys"][ACCOUNT_KEY].get("invalid_nonce", 0) == 0


async def test_a_reload_reopens_a_stream_only_when_its_settings_changed(
    http: aiohttp.ClientSession, world: RunningSimulator, tmp_path: Path,
) -> None:
    path = tmp_path / "exporter.yml"
    document = streaming_document(world, 60)
    write_config(path, document)
    async with running_exporter(path) as service:
        await scrape_until(http, service.url, "the stream", polled)
        assert await service.reload()
        document["keys"][0]["stream"]["reconcile_interval_seconds"] = 90
        samples = await scrape_until(http, service.url, "one connection", stream_up)
        assert sample(samples, "gemini_stream_connects_total", key="hot") == 1
        write_config(path, document)
        assert await service.reload()
        samples = await scrape_until(http, service.url, "a new connection", lambda s: sample(
            s, "gemini_stream_connects_total", key="hot") == 2 and stream_up(s))
        assert sample(samples, "gemini_account_poll_interval_seconds", account="delta") == 90
        document["keys"][0]["stream"]["enabled"] = False
        write_config(path, document)
        assert await service.reload()
        samples = await scrape_until(http, service.url, "no stream", lambda s: sample(
            s, "gemini_stream_up", key="hot") is None)
        # Without a stream, the planned interval again.
        assert sample(samples, "gemini_account_poll_interval_seconds", account="delta") == 60
    state = await (await http.get(f"{world.url}/_sim/stream")).json()
    assert state["connections"] == 0


def upgrade_headers(key: str, secret: str, nonce: int) -> dict[str, str]:
    payload = base64.b64encode(str(nonce).encode())
    return {"X-GEMINI-APIKEY": key, "X-GEMINI-NONCE": str(nonce),
            "X-GEMINI-PAYLOAD": payload.decode(),
            "X-GEMINI-SIGNATURE": hmac.new(secret.encode(), payload,
                                           hashlib.sha384).hexdigest()}


async def test_the_simulators_stream_follows_geminis_rules(
    http: aiohttp.ClientSession, world: RunningSimulator,
) -> None:
    now = int(time.time())
    for key, secret, nonce in ((MASTER_KEY, MASTER_SECRET, now),  # master keys: 401
                               (ACCOUNT_KEY, "wrong-secret-0", now),
                               (ACCOUNT_KEY, ACCOUNT_SECRET, now - 31)):  # outside 30 s
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(world.websocket_url,
                                  headers=upgrade_headers(key, secret, nonce))
        assert refused.value.status == 401
    async with http.ws_connect(world.websocket_url,
                               headers=upgrade_headers(ACCOUNT_KEY, ACCOUNT_SECRET, now)) as ws:
        await ws.send_json({"id": 7, "method": "subscribe", "params": ["balances@account"]})
        assert await ws.receive_json() == {"id": 7, "status": 200, "result": None}
        await ws.send_json({"id": 8, "method": "list_subscriptions"})
        assert (await ws.receive_json())["result"] == ["balances@account"]
        await set_usd(http, world, "55.5")
        frame = await ws.receive_json()
        assert frame["e"] == "balanceUpdate"
        assert frame["B"] == [{"a": "USD", "f": "55.5", "c": "55.5"}]
        assert json.dumps(frame["u"]).isdigit()


def test_config_check_says_which_keys_stream() -> None:
    path = Path(__file__).parent / "testdata" / "config" / "good" / "streaming_account_key.yml"
    summary = config_summary(load_config(path, environ={}))
    assert ("hot streams balances@account from ws://127.0.0.1:8765/: a change polls the "
            "account's balances as soon as the budget allows; regular polls at most every 10s "
            "while it is up") in summary
    assert "treasury streams" not in summary
