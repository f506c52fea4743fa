"""The exporter against a broken or hostile Gemini over real sockets: the simulator's hostile
faults (stamps from the future, redirects, huge bodies, gzip bombs, absurd Retry-After headers).
Whatever it sends, no wrong number reaches /metrics and polling goes on."""

import aiohttp
import pytest
import structlog
from aiohttp import web

from balance_exporter.service import Service
from balance_exporter.simulator.server import RunningSimulator
from tests.conftest import Serve
from tests.helpers import (
    Samples,
    add_fault,
    all_polled,
    sample,
    scrape,
    wait_until,
)

BTC_ALPHA = 5.12345678  # what the simulator holds; every hostile reply distorts it


def errors(samples: Samples, account: str, reason: str) -> float:
    return sample(samples, "gemini_account_poll_errors_total", account=account,
                  reason=reason) or 0.0


async def wait_for_errors(
    http: aiohttp.ClientSession, exporter: Service, account: str, reason: str, at_least: float
) -> Samples:
    samples: Samples = {}

    async def counted() -> bool:
        nonlocal samples
        samples = await scrape(http, exporter.url)
        assert sample(samples, "gemini_balance_amount", account=account,
                      currency="BTC" if account == "alpha" else "USD") is not None
        return errors(samples, account, reason) >= at_least

    await wait_until(counted, what=f"{at_least:g} times {reason} on {account}")
    return samples


async def test_a_stamp_from_the_future_is_refused_and_does_not_wedge_the_account(
    http: aiohttp.ClientSession, simulator: RunningSimulator, exporter: Service
) -> None:
    await all_polled(http, exporter)
    await add_fault(http, simulator, "alpha", {"kind": "future", "offset_seconds": 3.2e9,
                                               "count": 2})
    samples = await wait_for_errors(http, exporter, "alpha", "FutureTimestamp", 2)
    assert sample(samples, "gemini_balance_amount", account="alpha", currency="BTC") == BTC_ALPHA
    before = sample(samples, "gemini_account_polls_total", account="alpha") or 0.0

    async def fresh_again() -> bool:
        now = await scrape(http, exporter.url)
        # Later correct replies are accepted, not ignored as older than the future one.
        return ((sample(now, "gemini_account_polls_total", account="alpha") or 0) > before + 1
                and sample(now, "gemini_account_up", account="alpha") == 1
                and sample(now, "gemini_account_stale_replies_total", account="alpha") == 0)

    await wait_until(fresh_again, what="fresh replies accepted after the future stamp")


async def test_redirects_are_never_followed_and_name_the_host(
    http: aiohttp.ClientSession, simulator: RunningSimulator, exporter: Service, serve: Serve
) -> None:
    stolen: list[dict[str, str]] = []

    async def thief(request: web.Request) -> web.Response:
        stolen.append(dict(request.headers))
        return web.json_response([{"currency": "BTC", "amount": "999", "available": "999",
                                   "availableForWithdrawal": "999"}])

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", thief)
    thief_url = await serve(app)
    await all_polled(http, exporter)
    with structlog.testing.capture_logs() as logs:
        for status in (301, 302, 303, 307, 308):
            await add_fault(http, simulator, "alpha", {"kind": "redirect", "status": status,
                                                       "location": f"{thief_url}/v1/balances",
                                                       "count": 1})
        samples = await wait_for_errors(http, exporter, "alpha", "Redirect", 5)
    assert stolen == []  # not one request, and so no key or signature, reached the thief
    assert sample(samples, "gemini_balance_amount", account="alpha", currency="BTC") == BTC_ALPHA
    rejected = [entry for entry in logs if entry.get("reason") == "Redirect"]
    assert rejected
    assert all("127.0.0.1" in str(entry["error"]) and "not followed" in str(entry["error"])
               for entry in rejected)


@pytest.mark.parametrize("fault", [
    {"kind": "huge", "size_bytes": 500 * 1024 * 1024},
    {"kind": "huge", "size_bytes": 1024 * 1024 * 1024, "gzip": True},
], ids=["500 MB body", "gzip bomb"])
async def test_a_reply_past_the_cap_is_malformed_and_the_exporter_stays_responsive(
    http: aiohttp.ClientSession, simulator: RunningSimulator, exporter: Service,
    fault: dict[str, object],
) -> None:
    await all_polled(http, exporter)
    await add_fault(http, simulator, "gamma", {**fault, "count": 1})
    samples = await wait_for_errors(http, exporter, "gamma", "ReplyTooLarge", 1)
    assert sample(samples, "gemini_balance_amount", account="gamma", currency="USD") == 42.0
    async with http.get(f"{exporter.url}/-/healthy") as response:
        assert response.status == 200


@pytest.mark.parametrize("retry_after", ["999999", "Fri, 31 Dec 9999 23:59:59 GMT",
                                         "9" * 400, "\u00b2", "soon"])
async def test_no_retry_after_parks_a_key_past_the_largest_backoff(
    http: aiohttp.ClientSession, simulator: RunningSimulator, exporter: Service,
    retry_after: str,
) -> None:
    await all_polled(http, exporter)
    await add_fault(http, simulator, "alpha", {"kind": "rate_limit", "retry_after": retry_after,
                                               "count": 1})
    samples = await wait_for_errors(http, exporter, "alpha", "RateLimit", 1)
    before = sample(samples, "gemini_account_polls_total", account="alpha") or 0.0

    async def polling_again() -> bool:
        now = await scrape(http, exporter.url)
        return (sample(now, "gemini_account_polls_total", account="alpha") or 0) > before + 1

    # The test config's max_backoff_seconds is 2: the key is back long before the limit.
    await wait_until(polling_again, what="the key to poll again after the clamped pause")
