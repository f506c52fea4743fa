"""Nonces that never go backwards.

Gemini rejects a nonce that is not larger than the last one it saw from the same key, so the
source remembers what it handed out and steps past it when the wall clock stalls or steps back.
Gemini also needs them to *arrive* in order, so every request of a key holds the source's lock
from taking a nonce until its reply is read.
"""

import asyncio
import time
from collections.abc import Callable

from balance_exporter.config import NonceUnit

_NS_PER_UNIT: dict[NonceUnit, int] = {"milliseconds": 1_000_000, "seconds": 1_000_000_000}


class NonceSource:
    def __init__(self, unit: NonceUnit, wall_clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.unit = unit
        self._ns_per_unit = _NS_PER_UNIT[unit]
        self._wall_clock_ns = wall_clock_ns
        self.last = 0
        self.lock = asyncio.Lock()

    def next(self) -> int:
        candidate = self._wall_clock_ns() // self._ns_per_unit
        self.last = max(candidate, self.last + 1)
        return self.last

    def rejected(self) -> None:
        """Gemini refused a nonce as invalid. A time-based key's nonce need only be within 30 s
        of Gemini's clock, and one carried far ahead by a forward step of this clock would lock
        the key out for as long as the step: its nonces follow the clock again. Any other key's
        nonces never go back, whatever Gemini says (it saw the larger ones)."""
        if self.unit == "seconds":
            self.last = min(self.last, self._wall_clock_ns() // self._ns_per_unit - 1)

    def __repr__(self) -> str:
        return f"NonceSource(unit={self.unit!r}, last={self.last})"
