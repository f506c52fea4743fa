"""Starting the simulator on a socket, with an optional background drift of balances."""

import asyncio
import contextlib
import random
from dataclasses import dataclass, field

from aiohttp import web

from balance_exporter.simulator.app import build_simulator_app
from balance_exporter.simulator.state import SimState


@dataclass
class RunningSimulator:
    state: SimState
    runner: web.AppRunner
    url: str
    drift_task: asyncio.Task[None] | None = field(default=None)

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
    state: SimState, host: str = "127.0.0.1", port: int = 0, drift_seconds: float = 0.0
) -> RunningSimulator:
    runner = web.AppRunner(build_simulator_app(state), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in str(bound_host) else bound_host
    running = RunningSimulator(state, runner, f"http://{shown}:{bound_port}")
    if drift_seconds > 0:
        running.drift_task = asyncio.create_task(_drift_forever(state, drift_seconds))
    return running
