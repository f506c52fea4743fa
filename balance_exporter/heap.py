"""The cyclic garbage collector's passes, kept off the event loop's critical moments.

Each pass of the collector stops the event loop for as long as it walks its generations, and at
10,000 accounts on 1,000 keys the whole heap is 130,000 tracked objects and a million references:
a pass over it took 80-200 ms, once a minute and at every change of the plan. Nearly all of it
lives as long as the plan does (targets, snapshots, rendered fragments, the key workers), so the
heap is kept frozen (`gc.freeze`), and what survives a second is frozen too, without a walk: the
polls replace every account's snapshot every few seconds, so the young objects are the live
snapshots themselves, and walking them every second (85,000 objects at 500 accounts polled each
second: 25 ms with the event loop stopped, 4 % of a poll's CPU) found nothing to collect. The
whole heap is walked only once it has grown by a quarter since its last walk (the rule CPython
applies to its oldest generation), which reclaims the reference cycles dropped meanwhile: they
are kept to at most a quarter of the heap. The heap's size is its allocated memory blocks, not
its tracked objects: a walk stops tracking the tuples it finds holding only numbers and strings,
and the polls' new ones are tracked again, so the count of tracked objects grows by half after
every walk with nothing to collect. Objects that no cycle holds are freed as soon as they are
dropped, frozen or not.
"""

import asyncio
import contextlib
import gc
import sys
from collections.abc import Callable, Iterator

# How often what survived is frozen, and the heap's growth looked at.
YOUNG_FREEZE_SECONDS = 1.0
# Net allocations that set off an automatic pass of the young generation meanwhile (CPython's
# default is 700): a pass would walk a second's survivors, which the next freeze takes anyway.
YOUNG_THRESHOLD = 100_000
# How much the heap may grow (in allocated memory blocks) before it is walked whole again.
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
    """When the whole heap is walked: once it has grown by `WHOLE_HEAP_GROWTH` since it was
    last walked (`size`: the heap's allocated memory blocks)."""

    def __init__(self, size: Callable[[], int] = sys.getallocatedblocks) -> None:
        self._size = size
        self._walked = size()

    def freeze_young(self) -> None:
        """Freeze what survived since the last freeze; walk the whole heap if it has grown
        enough."""
        gc.freeze()
        if self._size() > self._walked * WHOLE_HEAP_GROWTH:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self._walked = self._size()


async def collect_garbage_regularly(size: Callable[[], int] = sys.getallocatedblocks) -> None:
    """Freeze what survived every second, and walk the whole heap when it has grown by a
    quarter. The collector counts allocations minus deallocations, and a poll allocates about
    as many objects as it frees (its new rows, the old ones), so on its own the young generation
    grew for tens of seconds and its collection then stopped the event loop for 20-30 ms;
    frozen every second it never holds more than a second's objects, and freezing walks none
    (it moves a list)."""
    walks = HeapWalks(size)
    thresholds = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, *thresholds[1:])
    try:
        while True:
            await asyncio.sleep(YOUNG_FREEZE_SECONDS)
            if gc.isenabled():  # else a burst is being made (`burst_frozen`), frozen at its end
                walks.freeze_young()
    finally:
        gc.set_threshold(*thresholds)
