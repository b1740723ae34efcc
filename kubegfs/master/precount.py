"""A snapshot commit's chunk references, counted in slices before the commit is logged.

A first format-3 snapshot of a 1M-file tree commits ~200k new blocks holding ~1M chunk
references; counted inside the commit's apply they would hold the event loop for ~0.5 s (every
writer waits), and even a small one's (~500 blocks after 100 files changed) are 1-2 ms of the
apply on the way to its answer. The server counts them here instead, a slice at a time with the
loop turning in between, as soon as the new blocks' infos are known (while the blocks are still
on their way to the holders), while the snapshot is still pending (its pin protects every chunk it reaches, so
the early references change no decision: see ``MasterState.precount_blocks``), and the commit
takes them as its own only if no block was counted or released meanwhile (else, or if the build
ends without a commit, :func:`release` takes them back). Replay never sees
any of this: the logged op is the same, and its apply counts the references itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator

from .. import merkle
from .state import MasterState

PRECOUNT_MIN = 4096  # new blocks from which a commit not counted early (Snapshots._precount_early) is counted at the commit in slices
PRECOUNT_SLICE = 10_000  # chunk references per turn of the event loop


def slices(infos: Iterable[merkle.BlockInfo], per: int) -> Iterator[list[merkle.BlockInfo]]:
    """``infos`` in runs of about ``per`` chunk references each (a block is never split)."""
    cur: list[merkle.BlockInfo] = []
    n = 0
    for i in infos:
        cur.append(i)
        n += len(i.handles) >> 3  # packed int64s
        if n >= per:
            yield cur
            cur, n = [], 0
    if cur:
        yield cur


async def precount(st: MasterState, gen: int, infos: dict[bytes, merkle.BlockInfo],
                   per: int | None = None) -> bool:
    """Count the chunk references of ``infos`` (the blocks not counted at ``blocks_gen``
    ``gen``) into ``st`` in slices. True: they are counted and ``gen`` still holds, so the
    commit may carry ``_precounted`` (the caller must apply it before its next await); False:
    nothing is counted (a block was counted or released meanwhile, or ``gen`` was stale from
    the start: the references went back, in slices too), so the commit counts as usual."""
    if st.blocks_gen != gen:
        return False
    per = per or PRECOUNT_SLICE
    done: list[list[merkle.BlockInfo]] = []
    try:
        for part in slices(infos.values(), per):
            if st.blocks_gen != gen:
                break
            st.precount_blocks(part)
            done.append(part)
            await asyncio.sleep(0)
        if st.blocks_gen == gen:
            return True
        while done:
            st.unprecount_blocks(done[-1])
            done.pop()
            await asyncio.sleep(0)
        return False
    except BaseException:  # cancelled: nothing stays counted
        for part in done:
            st.unprecount_blocks(part)
        raise


async def release(st: MasterState, infos: dict[bytes, merkle.BlockInfo],
                  per: int | None = None) -> None:
    """Take back, in slices, the references :func:`precount` counted for all of ``infos`` (it
    returned True, and the commit did not take them: ``blocks_gen`` moved since, or the build
    ended without it)."""
    for part in slices(infos.values(), per or PRECOUNT_SLICE):
        st.unprecount_blocks(part)
        await asyncio.sleep(0)
