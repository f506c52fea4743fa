"""The HTTP side: /metrics, a landing page, and the health endpoints. No polling happens here."""

import html
import time

from aiohttp import web
from aiohttp.typedefs import Middleware

from balance_exporter import __version__
from balance_exporter.exposition import ExpositionCache
from balance_exporter.store import AccountSnapshot

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


def parse_listen_address(address: str) -> tuple[str | None, int]:
    """`host:port`, `:port` (all interfaces) or `[v6]:port`, as Prometheus exporters take it."""
    host, separator, port_text = address.rpartition(":")
    if not separator or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"--web.listen-address: {address!r} is not HOST:PORT")
    host = host.strip("[]")
    return host or None, int(port_text)

