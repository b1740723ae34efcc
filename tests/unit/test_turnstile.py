"""A chunk's concurrent pieces are written in offset order, one at a time; one that can never be
in order is let through quickly (for the store to refuse as a gap) instead of stalling."""

import asyncio

import pytest

from kubegfs.chunkserver.turnstile import Turnstile


class _Chunk:
    def __init__(self) -> None:
        self.length = 0
        self.log: list[int] = []
        self.inside = 0

    async def write(self, t: Turnstile, offset: int, n: int, fail: bool = False) -> None:
        async with t.turn(1, offset):
            self.inside += 1
            assert self.inside == 1, "two pieces of one chunk written at once"
            await asyncio.sleep(0.01)
            self.inside -= 1
            if fail:
                raise OSError("disk")
            assert offset <= self.length, "a gap was let through while the earlier piece could come"
            self.log.append(offset)
            self.length = offset + n


def test_pieces_arriving_out_of_order_are_written_in_order():
    async def main() -> list[int]:
        c = _Chunk()
        t = Turnstile(lambda h: c.length, wait=5)
        tasks = [asyncio.create_task(c.write(t, off, 10)) for off in (30, 10, 20)]
        await asyncio.sleep(0.05)
        tasks.append(asyncio.create_task(c.write(t, 0, 10)))  # the first piece comes last
        await asyncio.gather(*tasks)
        return c.log

    assert asyncio.run(main()) == [0, 10, 20, 30]


def test_a_rewrite_waits_for_the_chunk_but_not_for_its_length():
    async def main() -> list[int]:
        c = _Chunk()
        t = Turnstile(lambda h: c.length, wait=5)
        await c.write(t, 0, 10)
        await asyncio.gather(c.write(t, 0, 10), c.write(t, 5, 10))
        return c.log

    assert asyncio.run(main()) == [0, 0, 5]


def test_after_a_failed_piece_the_later_ones_go_at_once():
    async def main() -> float:
        c = _Chunk()
        t = Turnstile(lambda h: c.length, wait=30)
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def later() -> float:
            async with t.turn(1, 10):  # the store would refuse it as a gap
                return loop.time() - start

        first = asyncio.create_task(c.write(t, 0, 10, fail=True))
        second = asyncio.create_task(later())
        with pytest.raises(OSError):
            await first
        return await second

    assert asyncio.run(main()) < 1  # long before the 30 s wait


def test_a_piece_whose_predecessor_never_comes_waits_at_most_the_wait():
    async def main() -> float:
        c = _Chunk()
        t = Turnstile(lambda h: c.length, wait=0.2)
        loop = asyncio.get_running_loop()
        start = loop.time()
        async with t.turn(1, 50):
            pass
        return loop.time() - start

    assert 0.15 < asyncio.run(main()) < 2


def test_a_resent_piece_clears_the_failure():
    async def main() -> list[int]:
        c = _Chunk()
        t = Turnstile(lambda h: c.length, wait=5)
        with pytest.raises(OSError):
            await c.write(t, 0, 10, fail=True)
        assert t.ready(1, 10)  # broken: a later piece is let through for the store to refuse
        await c.write(t, 0, 10)  # the client's resend
        assert not t.ready(1, 20)  # in order again: a later piece waits for its predecessor
        return c.log

    assert asyncio.run(main()) == [0]
