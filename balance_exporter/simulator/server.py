"""Starting the simulator on a socket, with an optional background drift of balances."""

import asyncio
import contextlib
import random
import ssl
from dataclasses import dataclass, field

from aiohttp import web

from balance_exporter.simulator.control_api import CONTROL_ROUTES
from balance_exporter.simulator.private_api import (
    CLOCK_KEY,
    PRIVATE_ROUTES,
    STATE_KEY,
    ServerClock,
    sim_errors,
)
from balance_exporter.simulator.state import SimState
from balance_exporter.simulator.stream import HUB_KEY, STREAM_ROUTES, StreamHub


def build_simulator_app(state: SimState) -> web.Application:
    app = web.Application(middlewares=[sim_errors])
    app[STATE_KEY] = state
    app[CLOCK_KEY] = ServerClock()
    hub = app[HUB_KEY] = StreamHub()
    state.balance_listeners.append(hub.balances_changed)
    app.add_routes(PRIVATE_ROUTES)
    app.add_routes(CONTROL_ROUTES)
    app.add_routes(STREAM_ROUTES)
    return app


@dataclass
class RunningSimulator:
    state: SimState
    runner: web.AppRunner
    url: str
    drift_task: asyncio.Task[None] | None = field(default=None)

    @property
    def websocket_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/"

    async def close(self) -> None:
        if self.drift_task is not None:
            self.drift_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.drift_task
        await self.runner.cleanup()


async def _drift_forever(state: SimState, every_seconds: float) -> None:
    rng = random.Random()
    while True:
        await asyncio.sleep(every_seconds)
        state.drift(rng)


async def start_simulator(
    state: SimState, host: str = "127.0.0.1", port: int = 0, drift_seconds: float = 0.0,
    tls: ssl.SSLContext | None = None,
) -> RunningSimulator:
    """The simulator on a socket; over TLS with `tls`, as Gemini is (for proxy and CA tests)."""
    runner = web.AppRunner(build_simulator_app(state), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    scheme = "https" if tls else "http"
    running = RunningSimulator(state, runner, f"{scheme}://{shown}:{bound_port}")
    if drift_seconds > 0:
        running.drift_task = asyncio.create_task(_drift_forever(state, drift_seconds))
    return running
