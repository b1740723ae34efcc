"""The order in which a chunk's pieces are written when several arrive at once.

A client keeps a window of pieces in flight, each its own request down the replica chain, so a
chunkserver may be handed piece N+1 while piece N is still arriving (or, on another connection,
before N's request has been seen at all). A chunk file only grows at its end (a write past it
would leave a gap), so each piece waits here until the chunk's length reaches its offset and no
other piece of that chunk is being written; then it holds the chunk's turn while it writes.

A piece that can never be written in order is refused quickly rather than stalling the writer:
if an earlier piece of the chunk failed on this replica (its body was cut, its disk write
failed), every later one goes on at once and the store refuses the gap; if the earlier piece
never arrives at all, the later one waits at most ``wait`` seconds. The client leaves a replica
that missed a piece out of the chunk (kubegfs/client.py), as HDFS's pipeline recovery does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable


class Turnstile:
    def __init__(self, length: Callable[[int], int], wait: float = 2.0) -> None:
        self._length = length  # a chunk's current length (0 if it does not exist)
        self.wait = wait
        self._busy: set[int] = set()
        self._broken: dict[int, int] = {}  # chunk -> lowest offset of a piece that failed here
        self._changed: dict[int, asyncio.Event] = {}

    @contextlib.asynccontextmanager
    async def turn(self, h: int, offset: int) -> AsyncIterator[None]:
        """Hold chunk ``h``'s turn for a piece at ``offset`` (see the module docstring)."""
        await self._wait(h, offset)
        self._busy.add(h)
        ok = False
        try:
            yield
            ok = True
        finally:
            self._busy.discard(h)
            broken = self._broken.get(h)
            if not ok:
                self._broken[h] = offset if broken is None else min(broken, offset)
            elif broken is not None and offset <= broken:
                del self._broken[h]  # the failed piece has been written again
            ev = self._changed.pop(h, None)
            if ev is not None:
                ev.set()

    def ready(self, h: int, offset: int) -> bool:
        """Whether a piece at ``offset`` may go now (the store refuses it if it is a gap)."""
        if h in self._busy:
            return False
        if offset <= self._length(h):
            return True
        broken = self._broken.get(h)
        return broken is not None and broken < offset

    async def _wait(self, h: int, offset: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while not self.ready(h, offset):
            left = deadline - loop.time()
            if left <= 0 and h not in self._busy:
                return  # the earlier piece never came: the store refuses the gap
            ev = self._changed.setdefault(h, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), max(left, 0.05) if h not in self._busy else None)
