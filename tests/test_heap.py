"""The garbage collection policy: what survived frozen every second without a walk, the whole
heap walked only once its frozen part has grown by a quarter, and no pass while a burst of
long-lived objects is being made."""

import asyncio
import gc
import sys
import weakref
from collections.abc import Iterator

import pytest

from balance_exporter import heap
from tests.helpers import wait_until


class FakeCollector:
    """The `gc` functions the policy uses, and a heap of a size (`size`) the test sets."""

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.enabled = True
        self.threshold = (700, 10, 10)
        self.calls: list[str] = []

    def collect(self, generation: int = 2) -> int:
        self.calls.append(f"collect({generation})")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def size(self) -> int:
        return self.blocks

    def isenabled(self) -> bool:
        return self.enabled

    def get_threshold(self) -> tuple[int, int, int]:
        return self.threshold

    def set_threshold(self, *threshold: int) -> None:
        self.threshold = (threshold[0], threshold[1], threshold[2])


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> FakeCollector:
    fake = FakeCollector(blocks=1000)
    monkeypatch.setattr(heap, "gc", fake)
    return fake


@pytest.mark.parametrize(("blocks", "walks_whole_heap"), [(1249, False), (1250, False),
                                                          (1251, True)])
def test_the_whole_heap_is_walked_only_once_it_grew_by_more_than_a_quarter(
    collector: FakeCollector, blocks: int, walks_whole_heap: bool,
) -> None:
    walks = heap.HeapWalks(collector.size)  # last walked at 1,000 blocks
    collector.blocks = blocks
    walks.freeze_young()
    assert collector.calls == (["freeze", "unfreeze", "collect(2)", "freeze"] if walks_whole_heap
                               else ["freeze"])


def test_the_growth_counts_from_the_last_walk_of_the_whole_heap(
    collector: FakeCollector,
) -> None:
    walks = heap.HeapWalks(collector.size)
    collector.blocks = 1300
    walks.freeze_young()  # walks the whole heap: 1,300 is the new mark
    collector.calls.clear()
    collector.blocks = 1600  # 1.23 times 1,300
    walks.freeze_young()
    assert "unfreeze" not in collector.calls


async def test_survivors_are_frozen_every_interval_and_nothing_is_walked_unless_the_heap_grew(
    collector: FakeCollector, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(heap, "YOUNG_FREEZE_SECONDS", 0.001)
    task = asyncio.create_task(heap.collect_garbage_regularly(collector.size))

    async def frozen_twice() -> bool:
        return collector.calls.count("freeze") >= 2

    await wait_until(frozen_twice, "two freezes")
    assert collector.threshold == (heap.YOUNG_THRESHOLD, 10, 10)
    # No pass walks anything: the heap did not grow.
    assert collector.calls == ["freeze"] * len(collector.calls)
    collector.blocks = 2000

    async def walked() -> bool:
        return "unfreeze" in collector.calls

    await wait_until(walked, "a walk of the whole heap once it grew")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert collector.threshold == (700, 10, 10)  # the process's own, once the task ends


async def test_no_pass_while_a_burst_is_being_made(
    collector: FakeCollector, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(heap, "YOUNG_FREEZE_SECONDS", 0.001)
    collector.enabled = False  # what `burst_frozen` does while its block runs
    task = asyncio.create_task(heap.collect_garbage_regularly(collector.size))
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
    walks.freeze_young()  # the heap barely grew: the cycle stays out of sight
    assert watched() is not None
    with heap.burst_frozen():
        grown = [[index] for index in range(sys.getallocatedblocks() // 2 + 1)]
    walks.freeze_young()
    assert watched() is None
    assert len(grown) > 0
