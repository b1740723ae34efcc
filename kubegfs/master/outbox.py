"""The deletion gate: every order to delete something on a chunkserver waits here until the ops
it rests on are durable.

The master applies an op in memory first and logs it after (group commit), so for a moment the
in-memory state is ahead of the disk. Anything decided from that state may rest on an op that a
crash would erase. Copying data is harmless then; deleting is not: an ``rm`` that never reached
the log comes back after a restart, and its chunks must still be there (GFS §2.6.3: the log is
flushed before anything depends on it).

Invariants:
  * A chunkserver is told to delete a chunk copy or a record copy only through :class:`Outbox`,
    and only once ``durable_seq() >= tag``, where ``tag`` is the op-log seq of the newest op that
    was *applied* when the deletion was decided (``applied_seq()`` at ``order`` time, or the seq
    of the op that caused it when the caller knows it). Until then the order dies with the master;
    after a restart the chunkserver reports the copy again and the master decides afresh from what
    the log holds.
  * Nothing is released while a hold condition is active: ``holds`` is a list of predicates that
    return a reason (a string) to hold every deletion, or ``None``. Recovery's safe mode ("no
    deletions until enough chunks have been reported after a start") plugs in here with
    ``master.outbox.hold_deletions(predicate)``; held orders stay queued and go out once no hold
    condition remains.
  * An order is re-checked when it is released: ``still_wanted(cs_id, kind, key)`` answers from
    the state of that moment, so an order that went out of date while it waited (the copy became
    a counted replica again, a snapshot id was reused and its record shipped there) is dropped,
    never sent; ``None`` means "not now" (e.g. a write lease still holds the chunk): it stays.
  * Orders are soft state: lost on restart (re-derived from the next full heartbeat) and dropped
    for a chunkserver that is declared dead.

What goes through it: chunk garbage (freed by rm, mv over a file, overwrite, restore in place,
snapshot delete), copies of chunks the master does not know, stale copies (an older version, a
replica retired by a version bump, a short copy, a copy re-replication does not count), corrupt
chunks, record copies of deleted snapshots or bad copies, and directory blocks no committed
snapshot reaches (``still_wanted`` holds one a snapshot being built has shipped or relies on). A version bump itself is sent to
chunkservers before it is logged: that retires nothing (a replica with a newer version than the
log's is still counted after a restart); the replicas it leaves behind are retired only after
the bump is durable, through this gate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

log = logging.getLogger("kubegfs.master.outbox")

Kind = Literal["chunk", "record", "block"]
Key = int | str  # a chunk handle, a snapshot (record) id or a directory block's digest (hex)


class Outbox:
    def __init__(self, applied_seq: Callable[[], int], durable_seq: Callable[[], int],
                 still_wanted: Callable[[str, Kind, Key], bool | None] | None = None) -> None:
        self.applied_seq = applied_seq
        self.durable_seq = durable_seq
        self.still_wanted = still_wanted or (lambda _cs, _kind, _key: True)
        self.holds: list[Callable[[], str | None]] = []
        self._orders: dict[str, dict[tuple[Kind, Key], int]] = {}  # cs id -> (kind, key) -> tag
        self.released = 0
        self.dropped = 0

    def order(self, cs_id: str, kind: Kind, key: Key, seq: int | None = None) -> None:
        """Queue a deletion for ``cs_id``; it rests on every op applied so far (or up to ``seq``)."""
        tag = self.applied_seq() if seq is None else seq
        q = self._orders.setdefault(cs_id, {})
        q[(kind, key)] = max(tag, q.get((kind, key), 0))

    def hold_deletions(self, predicate: Callable[[], str | None]) -> None:
        """Hold every deletion while ``predicate()`` returns a reason (e.g. safe mode)."""
        self.holds.append(predicate)

    def cancel(self, cs_id: str, kind: Kind, key: Key) -> None:
        self._orders.get(cs_id, {}).pop((kind, key), None)

    def forget(self, cs_id: str) -> None:
        self._orders.pop(cs_id, None)

    def pending(self, cs_id: str, kind: Kind, key: Key) -> bool:
        return (kind, key) in self._orders.get(cs_id, {})

    def pending_on(self, kind: Kind, key: Key) -> set[str]:
        """The chunkservers with a queued deletion of this chunk or record."""
        return {cs for cs, q in self._orders.items() if (kind, key) in q}

    def held(self) -> str | None:
        for hold in self.holds:
            why = hold()
            if why:
                return why
        return None

    def waiting(self) -> int:
        return sum(len(q) for q in self._orders.values())

    def take(self, cs_id: str) -> tuple[list[int], list[str]]:
        """The chunk and record orders for ``cs_id`` that may go out now, removed from the queue;
        the rest stay until a later call."""
        got = self._take(cs_id, ("chunk", "record"))
        chunks = sorted(k for kind, k in got if kind == "chunk" and isinstance(k, int))
        records = sorted(k for kind, k in got if kind == "record" and isinstance(k, str))
        return chunks, records

    def take_blocks(self, cs_id: str) -> list[str]:
        """The directory-block orders (hex digests) for ``cs_id`` that may go out now."""
        return sorted(str(k) for _kind, k in self._take(cs_id, ("block",)))

    def _take(self, cs_id: str, kinds: tuple[Kind, ...]) -> list[tuple[Kind, Key]]:
        q = self._orders.get(cs_id)
        if not q or self.held():
            return []
        durable = self.durable_seq()
        out: list[tuple[Kind, Key]] = []
        for (kind, key), tag in list(q.items()):
            if kind not in kinds or tag > durable:
                continue
            wanted = self.still_wanted(cs_id, kind, key)
            if wanted is None:
                continue
            del q[(kind, key)]
            if not wanted:
                self.dropped += 1
                continue
            out.append((kind, key))
        if not q:
            self._orders.pop(cs_id, None)
        self.released += len(out)
        return out
