"""The cyclic collector paused across snapshot operations and switched on again after the last."""

import asyncio
import gc
import weakref

import pytest

from kubegfs.master import snapshots


def test_the_collector_comes_back_after_the_last_operation_ends(monkeypatch):
    monkeypatch.setattr(snapshots, "GC_AFTER", 0.01)
    q = snapshots.QuietGC()

    async def scenario():
        assert gc.isenabled()
        with q():
            assert not gc.isenabled()
            with q():  # two at once: it stays off until both are done
                pass
            assert not gc.isenabled()
        assert not gc.isenabled()  # its replies go out first
        with q():  # another one before it came back: still off, and back only after this one
            await asyncio.sleep(0.03)
            assert not gc.isenabled()
        await asyncio.sleep(0.03)
        assert gc.isenabled()

    asyncio.run(scenario())


def test_a_collector_that_was_off_stays_off(monkeypatch):
    monkeypatch.setattr(snapshots, "GC_AFTER", 0.0)
    q = snapshots.QuietGC()

    async def scenario():
        gc.disable()
        try:
            with q():
                pass
            await asyncio.sleep(0.01)
            assert not gc.isenabled()
        finally:
            gc.enable()

    asyncio.run(scenario())


@pytest.fixture
def passes():
    """The generations of the collector's passes while a test runs (what survives is unfrozen after)."""
    seen: list[int] = []

    def note(phase, info):
        if phase == "stop":
            seen.append(info["generation"])

    gc.callbacks.append(note)
    try:
        yield seen
    finally:
        gc.callbacks.remove(note)
        gc.unfreeze()


def test_a_big_operation_has_its_full_collection_once_its_replies_are_out(monkeypatch, passes):
    monkeypatch.setattr(snapshots, "GC_NOW", 1000)
    monkeypatch.setattr(snapshots, "GC_AFTER", 10.0)
    monkeypatch.setattr(snapshots, "GC_REPLY", 0.01)
    q = snapshots.QuietGC()

    async def scenario():
        passes.clear()  # an automatic pass while asyncio.run set up the loop is not the operation's
        with q():
            keep = [[i] for i in range(5000)]  # young objects that survive
        assert not gc.isenabled() and passes == []  # not before the loop turns (its replies go out first)
        await asyncio.sleep(0.03)
        assert gc.isenabled() and q.timer is None and passes == [2]
        with q():
            small = [[1]]
        assert not gc.isenabled() and q.timer is not None  # a small one waits for the timer
        q.timer.cancel()
        q._resume()
        return keep, small

    asyncio.run(scenario())


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_a_big_operation_freezes_what_survives_its_collection_but_not_its_garbage(monkeypatch):
    """Later full passes do not traverse its survivors again; a cycle it dropped is collected."""
    monkeypatch.setattr(snapshots, "GC_NOW", 1000)
    q = snapshots.QuietGC()

    async def scenario() -> tuple[list[list[int]], weakref.ref[_Node]]:
        before = gc.get_freeze_count()
        with q():
            keep = [[i] for i in range(5000)]  # young objects that survive
            a, b = _Node(), _Node()
            a.other, b.other = b, a  # a cycle, garbage once the names go
            dropped = weakref.ref(a)
            del a, b
        await asyncio.sleep(snapshots.GC_REPLY + 0.02)
        assert gc.isenabled() and dropped() is None
        assert gc.get_freeze_count() >= before + len(keep)
        return keep, dropped

    try:
        asyncio.run(scenario())
    finally:
        gc.unfreeze()


def test_an_operation_starting_before_the_big_collection_has_it_as_it_ends(monkeypatch, passes):
    monkeypatch.setattr(snapshots, "GC_NOW", 1000)
    monkeypatch.setattr(snapshots, "GC_REPLY", 10.0)
    q = snapshots.QuietGC()

    async def scenario():
        passes.clear()
        with q():
            keep = [[i] for i in range(5000)]
        with q():  # before the big one's pass: the collector stays off throughout this one
            assert not gc.isenabled() and passes == []
        assert passes == [] and q.timer is not None  # ... and its end owes the pass in turn
        q.timer.cancel()
        q._collect()
        assert gc.isenabled() and passes == [2]
        return keep

    asyncio.run(scenario())
