"""Keeping the cyclic garbage collector's passes off the event loop's critical moments.

Work that makes a burst of objects (parsing a config of 10,000 accounts, planning them) sets off
the collector's automatic passes again and again, and each walks the burst while the event loop
waits: stops of up to 100 ms, even when the work itself runs in a thread or in slices. The
service collects on its own schedule besides (every second and every minute), which is enough
meanwhile.
"""

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def automatic_collections_paused() -> Iterator[None]:
    """The collector's automatic passes off while the block runs (as they were after it)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
