"""Long work on the event loop, cut into slices: rendering many accounts, making and adopting a
plan of thousands. Between slices every poll, scrape and probe that came due gets its turn."""

import asyncio


class Slices:
    """Gives the event loop a turn whenever `seconds` have passed since its last one."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()

    async def pause_if_due(self) -> None:
        if self._loop.time() - self._started >= self._seconds:
            # Twice: the first turn puts this task at the head of the loop's next round, ahead
            # of the I/O and timers that came due meanwhile; those run while the second waits.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            self._started = self._loop.time()
