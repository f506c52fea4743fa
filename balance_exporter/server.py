"""The HTTP side: /metrics, a landing page and the health endpoints, and starting the server on
its listen address (TLS and basic auth from `--web.config.file`). No polling happens here.
"""

import asyncio
import html
import logging
import os
import resource
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware

from balance_exporter import __version__
from balance_exporter.exposition import ExpositionCache
from balance_exporter.metrics import ExporterCounters
from balance_exporter.store import AccountSnapshot, BalanceStore
from balance_exporter.webconfig import BasicAuth, WebConfig, ssl_context

log = structlog.get_logger("balance_exporter.server")

# Ports 9100-9999 are where other exporters live; this one keeps out of their way.
DEFAULT_LISTEN_ADDRESS = ":8397"
# Leaves room inside the 5 s a container runtime usually grants between SIGTERM and SIGKILL.
SHUTDOWN_TIMEOUT_SECONDS = 2.0
# A connection that has not sent a whole request this long after it opened or after its last
# response is closed: idle keep-alives, and slow (slowloris) headers alike. Prometheus opens a
# new one when it needs it.
IDLE_TIMEOUT_SECONDS = 30.0
# Failures that can repeat thousands of times a second (a flood of connections or malformed
# requests, accept() out of descriptors) are logged once per this interval, with a count.
LOG_INTERVAL_SECONDS = 10.0


# Descriptors the process needs besides HTTP connections (about 50 measured: the event loop,
# Gemini connections, resolver threads, logs), with room to spare.
RESERVED_DESCRIPTORS = 64
MAX_ACCEPT_BACKLOG = 128


def default_max_connections() -> int:
    """Half the descriptors left after the reserve, within [8, 512]: a flood of connections
    cannot starve the pollers, the log or the state file."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 512
    return max(8, min(512, (soft - RESERVED_DESCRIPTORS) // 2))

# Paths the server answers itself: the metrics under one of them would hide it, and the
# probes are served without basic auth.
RESERVED_PATHS = frozenset({"/", "/-/healthy", "/-/ready"})


def telemetry_path_problem(path: str) -> str | None:
    """Why `path` cannot be the metrics' path; None if it can."""
    if not path.startswith("/") or any(c.isspace() or c in "?#" for c in path):
        return f"{path[:100]!r} is not an absolute URL path (like /metrics)"
    if path in RESERVED_PATHS:
        return f"{path!r} is taken by the landing page or a probe; choose another path"
    return None


EXPOSITION_KEY = web.AppKey("exposition", ExpositionCache)
TELEMETRY_PATH_KEY = web.AppKey("telemetry_path", str)


async def metrics_handler(request: web.Request) -> web.Response:
    exposition = await request.app[EXPOSITION_KEY].render(
        request.headers.get("Accept", ""), request.headers.get("Accept-Encoding", "")
    )
    response = web.Response(body=exposition.body, headers={"Vary": "Accept, Accept-Encoding"})
    response.headers["Content-Type"] = exposition.content_type
    if exposition.content_encoding:
        response.headers["Content-Encoding"] = exposition.content_encoding
    return response


def _status(snapshot: AccountSnapshot) -> str:
    balances = snapshot.balances
    if not balances.attempted:
        return "waiting for first poll"
    return "up" if balances.up else f"down ({balances.last_error})"


def _age(snapshot: AccountSnapshot, now: float) -> str:
    if snapshot.balances.last_success_seconds is None:
        return "no data yet"
    return f"{now - snapshot.balances.last_success_seconds:.0f}s"


def _total_value(snapshot: AccountSnapshot) -> float | None:
    if snapshot.notional.last_success_seconds is None:
        return None
    return sum(row.amount for row in snapshot.notional.rows)


def _value_text(value: float, currency: str) -> str:
    return f"{value:,.2f} {currency}"


def _value_cell(snapshot: AccountSnapshot) -> str:
    currency = snapshot.target.notional_currency
    if currency is None:
        return "off"
    value = _total_value(snapshot)
    return "not yet" if value is None else _value_text(value, currency)


def _totals_text(snapshots: Sequence[AccountSnapshot]) -> str:
    """The total value per quote currency, saying how many of the accounts valued in it have
    a value yet: a sum over some of them is not the team's total."""
    totals: dict[str, list[float | None]] = {}
    for snapshot in snapshots:
        if snapshot.target.notional_currency is not None:
            totals.setdefault(snapshot.target.notional_currency, []).append(
                _total_value(snapshot))
    parts = []
    for currency, values in sorted(totals.items()):
        known = [value for value in values if value is not None]
        parts.append(f"<strong>{html.escape(_value_text(sum(known), currency))}</strong> "
                     f"({len(known)} of {len(values)} accounts valued"
                     + (", the others not yet" if len(known) < len(values) else "") + ")")
    return f"<p>Total value: {'; '.join(parts)}.</p>" if parts else ""


def _staked(snapshot: AccountSnapshot) -> str:
    if snapshot.target.staking_interval_seconds is None:
        return ""
    return ", ".join(f"{row.balance:g} {row.currency}" for row in snapshot.staking.rows[:5])


# Entries of these statuses wait for something: the 7-day hold, or a second administrator.
_PENDING_STATUSES = ("pending_time", "pending_mua")


def _allow_lists_cell(snapshot: AccountSnapshot) -> str:
    """Each network's allow-list counts (HTML), a list with pending entries marked."""
    if not snapshot.target.allow_lists:
        return "off"
    parts = []
    for allow_list in snapshot.target.allow_lists:
        state = snapshot.allow_list(allow_list.network)
        network = html.escape(allow_list.network)
        if state.poll.last_success_seconds is None:
            parts.append(f"{network}: not yet")
            continue
        rows = state.poll.rows
        pending = {status: sum(row.entries for row in rows if row.status == status)
                   for status in _PENDING_STATUSES}
        text = f"{network}: {sum(row.entries for row in rows)}"
        if any(pending.values()):
            waiting = ", ".join(f"{count} {status.replace('_', '-')}"
                                for status, count in pending.items() if count)
            text += f' <span class="warning">&#9888; {waiting}</span>'
        if state.added:
            text += f", {state.added} added since start"
        parts.append(text + ("" if state.poll.up else " (the last poll failed)"))
    return "; ".join(parts)


def _duration_text(seconds: float) -> str:
    minutes = int(max(0.0, seconds) // 60)
    return f"{minutes // 60}h {minutes % 60}m" if minutes >= 60 else f"{minutes}m"


def _withdrawals_cell(snapshot: AccountSnapshot, now: float) -> str:
    """The account's pending withdrawals and the oldest one's age (HTML), marked past the
    account's threshold."""
    if snapshot.target.transfers_interval_seconds is None:
        return "off"
    state = snapshot.transfers.poll
    if state.last_success_seconds is None:
        return "not yet"
    rows = [row for row in state.rows if row.type == "withdrawal" and row.pending]
    if not rows:
        return "none"
    oldest = min(row.oldest_pending_ms for row in rows if row.oldest_pending_ms is not None)
    age = now - oldest / 1000
    amounts = ", ".join(f"{row.pending_amount.normalize():f} {row.currency}" for row in rows)
    text = html.escape(f"{sum(row.pending for row in rows)} ({amounts}), oldest "
                       f"{_duration_text(age)}")
    limit = snapshot.target.max_withdrawal_pending_seconds
    return f'<span class="warning">&#9888; {text}</span>' if limit and age > limit else text


def _discovery_text(store: BalanceStore, now: float) -> str:
    lines = []
    for key in store.key_counters():
        discovery = key.discovery
        if discovery is None:
            continue
        when = (f"listed {now - discovery.last_success_seconds:.0f}s ago"
                if discovery.last_success_seconds is not None else "not listed yet")
        lines.append(f"Key {key.name}: {len(discovery.listed)} accounts listed, "
                     f"{discovery.polled} discovered and polled, {when}"
                     + ("" if discovery.up or not discovery.attempted else
                        " (the last listing failed)"))
    return "".join(f"<p>{html.escape(line)}.</p>" for line in lines)


def _streams_text(store: BalanceStore, now: float) -> str:
    """Each streaming key's stream, and when its last frame came."""
    lines = []
    for key in store.key_counters():
        stream = key.stream
        if stream is None:
            continue
        last = (f"last frame {now - stream.last_frame_seconds:.0f}s ago"
                if stream.last_frame_seconds is not None else "no frame yet")
        state = "up" if stream.up else "down (balances polled at their interval)"
        lines.append(f"<p>{html.escape(f'Key {key.name}: stream {state}, {last}')}.</p>")
    return "".join(lines)


def _roles_text(store: BalanceStore) -> str:
    """Each key's roles, with a warning beside a key that can trade or move funds."""
    lines = []
    for key in store.key_counters():
        state = key.roles
        failed = " (the last ask failed)" if state.attempted and not state.up else ""
        if state.roles is None:
            lines.append(f"<p>Key {html.escape(key.name)}: roles not read yet{failed}.</p>")
            continue
        held = [role for role, has in state.roles.held().items() if has] or ["none"]
        text = f"Key {key.name}: roles {', '.join(held)}{failed}"
        if state.roles.beyond_auditor:
            lines.append(f'<p class="warning">&#9888; {html.escape(text)}: this key can trade '
                         "or move funds; a monitoring key needs Auditor only.</p>")
        else:
            lines.append(f"<p>{html.escape(text)}.</p>")
    return "".join(lines)


async def landing_handler(request: web.Request) -> web.Response:
    now = time.time()
    path = html.escape(request.app[TELEMETRY_PATH_KEY])
    store = request.app[EXPOSITION_KEY].store
    snapshots = store.account_snapshots()
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in (
            snapshot.target.label,
            snapshot.target.key_name,
            _status(snapshot),
            _age(snapshot, now),
            f"{snapshot.target.interval_seconds:g}s",
            str(len(snapshot.balances.rows)),
            _value_cell(snapshot),
            _staked(snapshot),
        )) + f"<td>{_allow_lists_cell(snapshot)}</td>"
        f"<td>{_withdrawals_cell(snapshot, now)}</td></tr>"
        for snapshot in snapshots
    )
    total = _totals_text(snapshots)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Gemini balance exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em 1em;text-align:left}}
.warning{{color:#a40000;font-weight:bold}}</style>
</head><body>
<h1>Gemini balance exporter</h1>
<p>Version {html.escape(__version__)}. Metrics: <a href="{path}">{path}</a>.
Health: <a href="/-/healthy">/-/healthy</a>, readiness: <a href="/-/ready">/-/ready</a>.</p>
{total}{_discovery_text(store, now)}{_roles_text(store)}{_streams_text(store, now)}
<table><thead><tr><th>Account</th><th>Key</th><th>Status</th><th>Data age</th>
<th>Poll interval</th><th>Currencies</th><th>Total value</th><th>Staked</th>
<th>Withdrawal allow-lists</th><th>Pending withdrawals</th></tr></thead>
<tbody>
{rows}
</tbody></table>
</body></html>
"""
    return web.Response(text=page, content_type="text/html")


async def healthy_handler(request: web.Request) -> web.Response:
    # Unhealthy while a key is not polled at all: a restart of the process is then better
    # than serving ever older balances.
    stopped = request.app[EXPOSITION_KEY].store.stopped_workers()
    if stopped:
        return web.Response(status=503, text="Unhealthy: no poll worker running for keys "
                            + ", ".join(stopped) + "\n")
    return web.Response(text="Healthy\n")


async def ready_handler(request: web.Request) -> web.Response:
    if request.app[EXPOSITION_KEY].store.all_attempted():
        return web.Response(text="Ready\n")
    return web.Response(status=503, text="Not ready: some accounts have not been polled yet\n")


async def _rendering_in_the_background(app: web.Application) -> AsyncIterator[None]:
    """While the app runs, its exposition renders changed accounts between scrapes."""
    app[EXPOSITION_KEY].start()
    yield
    await app[EXPOSITION_KEY].close()


def build_app(
    exposition: ExpositionCache,
    telemetry_path: str = "/metrics",
    middlewares: tuple[Middleware, ...] = (),
) -> web.Application:
    problem = telemetry_path_problem(telemetry_path)
    if problem is not None:
        raise ValueError(problem)
    app = web.Application(middlewares=middlewares)
    app[EXPOSITION_KEY] = exposition
    app.cleanup_ctx.append(_rendering_in_the_background)
    app[TELEMETRY_PATH_KEY] = telemetry_path
    app.router.add_get(telemetry_path, metrics_handler)
    app.router.add_get("/", landing_handler)
    app.router.add_get("/-/healthy", healthy_handler)
    app.router.add_get("/-/ready", ready_handler)
    return app


@dataclass(frozen=True)
class ListenAddress:
    """`host:port`, `:port` (all interfaces) or `[v6]:port`, as Prometheus exporters take it."""

    host: str | None
    port: int

    @classmethod
    def parse(cls, address: str) -> "ListenAddress":
        host, separator, port_text = address.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        if bracketed:
            host = host[1:-1]
        if (not separator or not port_text.isascii() or not port_text.isdigit()
                or not 0 <= int(port_text) <= 65535 or any(c in host for c in "[]/ ")
                or (":" in host and not bracketed)):
            raise ValueError(f"{address!r} is not HOST:PORT (e.g. :8397, 127.0.0.1:8397, "
                             "[::1]:8397)")
        return cls(host or None, int(port_text))

    def __str__(self) -> str:
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def _cause(error: OSError) -> str:
    # asyncio rewrites the message around the address tuple; the errno says it plainly.
    if error.errno is not None and error.errno > 0:
        return os.strerror(error.errno).lower()
    return (error.strerror or str(error) or type(error).__name__).lower()


class ListenError(Exception):
    """The server could not listen on its address (in use, not this host's, not allowed)."""


@dataclass(frozen=True)
class WebOptions:
    listen_address: ListenAddress = field(
        default_factory=lambda: ListenAddress.parse(DEFAULT_LISTEN_ADDRESS))
    telemetry_path: str = "/metrics"
    web_config: WebConfig | None = None
    access_log: bool = False
    idle_timeout_seconds: float = IDLE_TIMEOUT_SECONDS
    max_connections: int = field(default_factory=default_max_connections)


class _Throttle:
    """Lets a log line through at most once per interval, and counts the ones it held back:
    what can happen thousands of times a second must not flood the log."""

    def __init__(self, interval_seconds: float = LOG_INTERVAL_SECONDS) -> None:
        self._interval = interval_seconds
        self._last = float("-inf")
        self._held_back = 0

    def allow(self) -> int | None:
        """None to hold this one back, or how many were held back since the last one."""
        now = time.monotonic()
        if now - self._last < self._interval:
            self._held_back += 1
            return None
        held_back, self._held_back, self._last = self._held_back, 0, now
        return held_back


class _CappedConnections:
    """aiohttp's protocol factory, at most `limit` connections at once: a new connection past it
    closes the oldest open one, which under a flood is one of the flood's slow ones (a scrape
    takes milliseconds), so a flood cannot lock Prometheus out."""

    def __init__(self, server: web.Server, limit: int, counters: ExporterCounters) -> None:
        self._server = server
        self._limit = limit
        self._counters = counters
        self._throttle = _Throttle()

    def __call__(self) -> asyncio.Protocol:
        open_connections = [handler for handler in self._server.connections
                            if handler.transport is not None]
        if len(open_connections) >= self._limit:
            open_connections[0].force_close()
            self._counters.http_connections_closed += 1
            if self._throttle.allow() is not None:
                log.warning("too many HTTP connections; closing the oldest ones",
                            limit=self._limit,
                            closed_so_far=self._counters.http_connections_closed)
        return self._server()


class _BadRequestLog(logging.Filter):
    """aiohttp logs each malformed request as an error with a traceback: one warning line per
    interval (with how many came since) instead, naming what was wrong. Other records pass."""

    def __init__(self, counters: ExporterCounters) -> None:
        super().__init__()
        self._counters = counters
        self._throttle = _Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        self._counters.http_bad_requests += 1
        held_back = self._throttle.allow()
        if held_back is None:
            return False
        record.msg = "bad HTTP request answered 400: %s (%d more since the last such line)"
        record.args = (" ".join(str(error.message).split())[:200], held_back)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
        return True


class _AcceptErrorLog:
    """asyncio logs every failed accept() with a traceback (thousands a second when out of
    descriptors): one line per interval with a count instead; anything else as before."""

    def __init__(self, loop: asyncio.AbstractEventLoop, counters: ExporterCounters) -> None:
        self._counters = counters
        # The loop's handler before this one: everything but accept errors goes to it, and it is
        # put back when the server stops.
        self.previous = loop.get_exception_handler()
        self._throttle = _Throttle()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), OSError) and "accept" in str(
                context.get("message", "")):
            self._counters.http_accept_errors += 1
            held_back = self._throttle.allow()
            if held_back is not None:
                log.error("cannot accept HTTP connections", error=str(context["exception"]),
                          repeated=held_back)
            return
        if self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)


class WebServer:
    """The app on its socket: bound by `start`, which says in one line why it could not be."""

    def __init__(self, exposition: ExpositionCache, options: WebOptions) -> None:
        self._options = options
        self._counters = exposition.counters
        web_config = options.web_config
        middlewares: tuple[Middleware, ...] = ()
        self._auth = (BasicAuth(web_config.basic_auth_users)
                      if web_config and web_config.basic_auth_users else None)
        if self._auth is not None:
            middlewares = (self._auth.middleware,)
        self._tls = web_config.tls_server_config if web_config else None
        self._runner = web.AppRunner(
            build_app(exposition, options.telemetry_path, middlewares),
            shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
            access_log=logging.getLogger("aiohttp.access") if options.access_log else None,
            keepalive_timeout=options.idle_timeout_seconds,
        )
        self._listener: asyncio.Server | None = None
        self._accept_errors: _AcceptErrorLog | None = None
        self._bad_requests = _BadRequestLog(self._counters)
        self.port: int | None = None

    async def start(self) -> None:
        address = self._options.listen_address
        context = ssl_context(self._tls) if self._tls else None
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        self._accept_errors = _AcceptErrorLog(loop, self._counters)
        loop.set_exception_handler(self._accept_errors)
        logging.getLogger("aiohttp.server").addFilter(self._bad_requests)
        assert self._runner.server is not None  # made by setup()
        connections = _CappedConnections(self._runner.server, self._options.max_connections,
                                         self._counters)
        try:
            # asyncio accepts up to `backlog` connections in one pass, before the ones closed
            # to make room give their descriptors back: a pass must fit in what the cap leaves.
            self._listener = await loop.create_server(
                connections, address.host, address.port, ssl=context, reuse_address=True,
                backlog=max(1, min(MAX_ACCEPT_BACKLOG, self._options.max_connections // 2)))
        except OSError as error:
            await self._runner.cleanup()
            raise ListenError(f"cannot listen on {address}: {_cause(error)}") from None
        self.port = int(self._listener.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = self._options.listen_address.host
        scheme = "https" if self._tls else "http"
        shown = "localhost" if host in (None, "0.0.0.0", "::") else host  # noqa: S104
        shown = f"[{shown}]" if ":" in shown else shown
        return f"{scheme}://{shown}:{self.port}"

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        await self._runner.cleanup()
        logging.getLogger("aiohttp.server").removeFilter(self._bad_requests)
        if self._accept_errors is not None:
            asyncio.get_running_loop().set_exception_handler(self._accept_errors.previous)
        if self._auth is not None:
            self._auth.close()
