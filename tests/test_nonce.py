from itertools import pairwise

from balance_exporter.gemini.nonce import NonceSource


class SteppingClock:
    """A wall clock that returns the given readings in order (in nanoseconds)."""

    def __init__(self, *readings_ns: int) -> None:
        self._readings = list(readings_ns)

    def __call__(self) -> int:
        return self._readings.pop(0)


def test_millisecond_nonces_follow_the_clock() -> None:
    source = NonceSource("milliseconds", SteppingClock(1_700_000_000_000_000_000,
                                                       1_700_000_000_500_000_000))
    assert source.next() == 1_700_000_000_000
    assert source.next() == 1_700_000_000_500


def test_nonces_increase_strictly_when_the_clock_steps_back() -> None:
    source = NonceSource("milliseconds", SteppingClock(
        1_700_000_010_000_000_000, 1_700_000_000_000_000_000, 1_699_999_000_000_000_000,
        1_700_000_020_000_000_000,
    ))
    nonces = [source.next() for _ in range(4)]
    assert nonces == [1_700_000_010_000, 1_700_000_010_001, 1_700_000_010_002, 1_700_000_020_000]


def test_nonces_increase_strictly_when_the_clock_stands_still() -> None:
    source = NonceSource("milliseconds", lambda: 1_700_000_000_000_000_000)
    nonces = [source.next() for _ in range(100)]
    assert all(later > earlier for earlier, later in pairwise(nonces))


def test_second_nonces_are_whole_seconds_and_still_increase() -> None:
    source = NonceSource("seconds", SteppingClock(
        1_700_000_000_100_000_000, 1_700_000_000_900_000_000, 1_700_000_002_000_000_000,
    ))
    assert [source.next() for _ in range(3)] == [1_700_000_000, 1_700_000_001, 1_700_000_002]


HOUR_NS = 3600 * 10**9


def test_a_time_based_key_follows_the_clock_again_after_a_rejected_nonce() -> None:
    """The clock stepped an hour ahead for one request and came back."""
    now = 1_700_000_000 * 10**9
    source = NonceSource("seconds", SteppingClock(now + HOUR_NS, now + 10**9, now + 10**9,
                                                  now + 2 * 10**9))
    assert source.next() == 1_700_003_600  # Gemini refuses it: more than 30 s ahead
    assert source.next() == 1_700_003_601  # still ahead: nonces do not go back on their own
    source.rejected()
    assert source.next() == 1_700_000_002


def test_a_millisecond_key_never_goes_back_even_after_a_rejected_nonce() -> None:
    now = 1_700_000_000 * 10**9
    source = NonceSource("milliseconds", SteppingClock(now + HOUR_NS, now, now))
    first = source.next()
    source.rejected()
    assert source.next() == first + 1
