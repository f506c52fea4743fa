"""Gemini's private-endpoint rate limit: 600 requests a minute per key; up to 5 requests over
that are queued (answered late), and past those every request gets 429 until the rate falls.
Modelled as a generic cell rate algorithm (a leaky bucket that keeps one number).
"""

import math


class RateLimiter:
    def __init__(self, per_minute: float = 600, queued: int = 5) -> None:
        self.spacing = 60.0 / per_minute
        self.queued = queued
        self._theoretical_arrival = float("-inf")

    def admit(self, now: float) -> float | None:
        """The delay before answering this request, or None if it is to get a 429."""
        arrival = max(self._theoretical_arrival, now)
        delay = arrival - now
        if delay > self.queued * self.spacing + 1e-9:
            return None
        self._theoretical_arrival = arrival + self.spacing
        return delay

    def retry_after(self, now: float) -> int:
        """Whole seconds until a request would be admitted again."""
        wait = self._theoretical_arrival - now - self.queued * self.spacing
        return max(1, math.ceil(wait))
