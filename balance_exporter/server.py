"""The HTTP side: /metrics, a landing page and the health endpoints, and starting the server on
its listen address (TLS and basic auth from `--web.config.file`). No polling happens here.
"""

import html
import logging
import os
import time
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Middleware

from balance_exporter import __version__
from balance_exporter.exposition import ExpositionCache
from balance_exporter.store import AccountSnapshot
from balance_exporter.webconfig import BasicAuth, WebConfig, ssl_context

# Ports 9100-9999 are where other exporters live; this one keeps out of their way.
DEFAULT_LISTEN_ADDRESS = ":8397"
# Leaves room inside the 5 s a container runtime usually grants between SIGTERM and SIGKILL.
SHUTDOWN_TIMEOUT_SECONDS = 2.0

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
    if not snapshot.attempted:
        return "waiting for first poll"
    return "up" if snapshot.up else f"down ({snapshot.last_error})"


def _age(snapshot: AccountSnapshot, now: float) -> str:
    if snapshot.last_success_seconds is None:
        return "no data yet"
    return f"{now - snapshot.last_success_seconds:.0f}s"


async def landing_handler(request: web.Request) -> web.Response:
    now = time.time()
    path = html.escape(request.app[TELEMETRY_PATH_KEY])
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in (
            snapshot.target.label,
            snapshot.target.key_name,
            _status(snapshot),
            _age(snapshot, now),
            f"{snapshot.target.interval_seconds:g}s",
            str(len(snapshot.balances)),
        )) + "</tr>"
        for snapshot in request.app[EXPOSITION_KEY].store.account_snapshots()
    )
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Gemini balance exporter</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em 1em;text-align:left}}</style>
</head><body>
<h1>Gemini balance exporter</h1>
<p>Version {html.escape(__version__)}. Metrics: <a href="{path}">{path}</a>.
Health: <a href="/-/healthy">/-/healthy</a>, readiness: <a href="/-/ready">/-/ready</a>.</p>
<table><thead><tr><th>Account</th><th>Key</th><th>Status</th><th>Data age</th>
<th>Poll interval</th><th>Currencies</th></tr></thead>
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


def build_app(
    exposition: ExpositionCache,
    telemetry_path: str = "/metrics",
    middlewares: tuple[Middleware, ...] = (),
) -> web.Application:
    app = web.Application(middlewares=middlewares)
    app[EXPOSITION_KEY] = exposition
    app[TELEMETRY_PATH_KEY] = telemetry_path
    app.router.add_get(telemetry_path, metrics_handler)
    if telemetry_path != "/":
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
    # aiohttp rewrites the message around the address; the errno says it plainly.
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


class WebServer:
    """The app on its socket: bound by `start`, which says in one line why it could not be."""

    def __init__(self, exposition: ExpositionCache, options: WebOptions) -> None:
        self._options = options
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
        )
        self.port: int | None = None

    async def start(self) -> None:
        address = self._options.listen_address
        context = ssl_context(self._tls) if self._tls else None
        await self._runner.setup()
        site = web.TCPSite(self._runner, address.host, address.port, ssl_context=context)
        try:
            await site.start()
        except OSError as error:
            await self._runner.cleanup()
            raise ListenError(f"cannot listen on {address}: {_cause(error)}") from None
        sockets = self._runner.addresses
        self.port = int(sockets[0][1]) if sockets else address.port

    @property
    def url(self) -> str:
        host = self._options.listen_address.host
        scheme = "https" if self._tls else "http"
        shown = "localhost" if host in (None, "0.0.0.0", "::") else host  # noqa: S104
        shown = f"[{shown}]" if ":" in shown else shown
        return f"{scheme}://{shown}:{self.port}"

    async def stop(self) -> None:
        await self._runner.cleanup()
        if self._auth is not None:
            self._auth.close()
