"""The cyclic garbage collector's passes, kept off the event loop's critical moments.

Each pass of the collector stops the event loop for as long as it walks its generations, and at
10,000 accounts on 1,000 keys the whole heap is 130,000 tracked objects and a million references:
a pass over it took 80-200 ms, once a minute and at every change of the plan. Nearly all of it
lives as long as the plan does (targets, snapshots, rendered fragments, the key workers), so the
heap is kept frozen (`gc.freeze`): a regular pass walks only what was made since the last freeze,
and the whole heap is walked only once the frozen part has grown by a quarter since its last walk
(the rule CPython applies to its oldest generation), which reclaims the reference cycles among
frozen objects that were dropped meanwhile. Objects that no cycle holds are freed as soon as
they are dropped, frozen or not.
"""

import asyncio
import contextlib
import gc
from collections.abc import Iterator

# How often the young generations are collected, and what was made since the last freeze.
YOUNG_COLLECTION_SECONDS = 1.0
RECENT_COLLECTION_SECONDS = 60.0
# How much the frozen heap may grow (in tracked objects) before it is walked whole again.
WHOLE_HEAP_GROWTH = 1.25


def freeze_startup_heap() -> None:
    """Move what start-up made (modules, classes, the config) out of the collector's sight,
    after collecting what start-up left as garbage."""
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def burst_frozen() -> Iterator[None]:
    """The collector's automatic passes off while the block runs, and what it made frozen after.

    Work that makes a burst of long-lived objects (reading a config of 10,000 accounts, planning
    them) would otherwise set off the automatic passes again and again, each walking the burst
    while the event loop waits (stops of up to 140 ms, even when the work itself runs in a
    thread or in slices); the regular passes wait meanwhile (see `collect_garbage_regularly`).
    What polls leave as garbage meanwhile is freed as usual, except reference cycles: those
    are frozen with the burst until the next walk of the whole heap."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


class HeapWalks:
    """When the whole heap is walked: once the frozen part has grown by `WHOLE_HEAP_GROWTH`
    since it was last walked."""

    def __init__(self) -> None:
        self._walked = gc.get_freeze_count()

    def collect_recent(self) -> None:
        """Collect what was made since the last freeze and freeze what survives; walk the whole
        heap as well if the frozen part has grown enough."""
        gc.collect()
        gc.freeze()
        if gc.get_freeze_count() > self._walked * WHOLE_HEAP_GROWTH:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self._walked = gc.get_freeze_count()


async def collect_garbage_regularly() -> None:
    """Collect the young generations every second and what was made since the last freeze
    every minute, passes the process does not get on its own. The collector counts allocations
    minus deallocations, and a poll allocates about as many objects as it frees (its new rows,
    the old ones), so the young generation grew for tens of seconds and its collection then
    stopped the event loop for 20-30 ms. Collected every second it holds a second's objects: a
    millisecond."""
    loop = asyncio.get_running_loop()
    walks = HeapWalks()
    last_recent = loop.time()
    while True:
        await asyncio.sleep(YOUNG_COLLECTION_SECONDS)
        if not gc.isenabled():
            continue  # a burst is being made (see `burst_frozen`): a pass would walk it
        if loop.time() - last_recent >= RECENT_COLLECTION_SECONDS:
            walks.collect_recent()
            last_recent = loop.time()
        else:
            gc.collect(1)
