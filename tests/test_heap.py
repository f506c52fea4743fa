"""The garbage collection policy: young generations every second, what was made since the last
freeze every minute, the whole heap only once its frozen part has grown by a quarter, and no
pass while a burst of long-lived objects is being made."""

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from balance_exporter import heap
from tests.helpers import wait_until


class FakeCollector:
    """The `gc` functions the policy uses, with a frozen part of a size the test sets."""

    def __init__(self, frozen: int) -> None:
        self.frozen = frozen
        self.enabled = True
        self.calls: list[str] = []

    def collect(self, generation: int = 2) -> int:
        self.calls.append(f"collect({generation})")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def get_freeze_count(self) -> int:
        return self.frozen

    def isenabled(self) -> bool:
        return self.enabled


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> FakeCollector:
    fake = FakeCollector(frozen=1000)
    monkeypatch.setattr(heap, "gc", fake)
    return fake


@pytest.mark.parametrize(("frozen", "walks_whole_heap"), [(1249, False), (1250, False),
                                                          (1251, True)])
def test_the_whole_heap_is_walked_only_once_its_frozen_part_grew_by_more_than_a_quarter(
    collector: FakeCollector, frozen: int, walks_whole_heap: bool,
) -> None:
    walks = heap.HeapWalks()  # last walked at 1,000 frozen objects
    collector.frozen = frozen
    walks.collect_recent()
    recent = ["collect(2)", "freeze"]
    assert collector.calls == ([*recent, "unfreeze", "collect(2)", "freeze"] if walks_whole_heap
                               else recent)


def test_the_growth_counts_from_the_last_walk_of_the_whole_heap(
    collector: FakeCollector,
) -> None:
    walks = heap.HeapWalks()
    collector.frozen = 1300
    walks.collect_recent()  # walks the whole heap: 1,300 is the new mark
    collector.calls.clear()
    collector.frozen = 1600  # 1.23 times 1,300
    walks.collect_recent()
    assert "unfreeze" not in collector.calls


async def test_young_generations_every_interval_the_recent_objects_now_and_then(
    collector: FakeCollector, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(heap, "YOUNG_COLLECTION_SECONDS", 0.001)
    monkeypatch.setattr(heap, "RECENT_COLLECTION_SECONDS", 0.02)
    task = asyncio.create_task(heap.collect_garbage_regularly())

    async def two_recent_collections() -> bool:
        return collector.calls.count("freeze") >= 2

    await wait_until(two_recent_collections, "two collections of the recent objects")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert collector.calls.count("collect(1)") > collector.calls.count("collect(2)") >= 2
    assert "unfreeze" not in collector.calls  # the frozen part did not grow


async def test_no_pass_while_a_burst_is_being_made(
    collector: FakeCollector, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(heap, "YOUNG_COLLECTION_SECONDS", 0.001)
    monkeypatch.setattr(heap, "RECENT_COLLECTION_SECONDS", 0.0)
    collector.enabled = False  # what `burst_frozen` does while its block runs
    task = asyncio.create_task(heap.collect_garbage_regularly())
    await asyncio.sleep(0.05)
    assert collector.calls == []
    collector.enabled = True

    async def collected() -> bool:
        return bool(collector.calls)

    await wait_until(collected, "a collection once the burst is over")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class Node:
    """An object that can be part of a reference cycle and be watched by a weak reference."""

    partner: "Node | None" = None


@pytest.fixture
def frozen_heap_restored() -> Iterator[None]:
    """This process's collector as it was: nothing left frozen, automatic passes on."""
    yield
    gc.unfreeze()
    gc.enable()
    gc.collect()


@pytest.mark.usefixtures("frozen_heap_restored")
def test_a_cycle_frozen_with_a_burst_is_reclaimed_by_the_next_walk_of_the_whole_heap() -> None:
    heap.freeze_startup_heap()
    walks = heap.HeapWalks()
    with heap.burst_frozen():
        assert not gc.isenabled()
        cycle = Node()
        cycle.partner = Node()
        cycle.partner.partner = cycle
        watched = weakref.ref(cycle)
    assert gc.isenabled()
    del cycle
    walks.collect_recent()  # the frozen part barely grew: the cycle stays out of sight
    assert watched() is not None
    with heap.burst_frozen():
        grown = [[index] for index in range(gc.get_freeze_count() // 2 + 1)]
    walks.collect_recent()
    assert watched() is None
    assert len(grown) > 0
