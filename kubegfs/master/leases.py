"""Write leases (HDFS's LeaseManager): one writer per path at a time, for ``LEASE_SECONDS``
after its last call.

A lease remembers what the writer was given: the file it opened (``node``) and its chunk list
(``base``), the chunks placed for it (``allocated``: handle → chunkserver ids) and the chunk an
append writes into in place (``inplace``). While a lease holds a chunk, re-replication leaves it
alone (``being_written``) and a copy reported for it is not garbage (``allocated``). When a lease
ends without its commit adopting a placed chunk, ``on_abandon(handle, chunkserver ids)`` is
called once for it: those copies are garbage.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import namespace as ns
from .. import paths
from ..errors import Conflict

LEASE_SECONDS = 60.0


@dataclass
class Lease:
    id: str
    path: str
    mode: str  # create | overwrite | append
    file_mode: int
    node: ns.File | None  # the file as opened (None: it did not exist)
    base: tuple[int, ...]  # chunks the commit's list must start with (an append's)
    inplace: int | None
    expires: float
    allocated: dict[int, list[str]] = field(default_factory=dict)


class LeaseTable:
    def __init__(self, on_abandon: Callable[[int, list[str]], None] | None = None,
                 seconds: float = LEASE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.on_abandon = on_abandon or (lambda _h, _ids: None)
        self.seconds = seconds
        self.clock = clock
        self.by_id: dict[str, Lease] = {}
        self.by_path: dict[str, str] = {}

    def grant(self, path: str, mode: str, file_mode: int, node: ns.File | None) -> Lease:
        """A new lease on ``path``; Conflict if another writer holds it."""
        self.expire()
        if path in self.by_path:
            raise Conflict(f"{path} is already being written")
        lease = Lease(uuid.uuid4().hex, path, mode, node.mode if node else file_mode, node,
                      node.chunks if (node and mode == "append") else (), None, self.clock() + self.seconds)
        self.by_id[lease.id] = lease
        self.by_path[path] = lease.id
        return lease

    def renew(self, lid: str) -> Lease:
        """The live lease ``lid``, good for another ``seconds``; Conflict if it is gone."""
        self.expire()
        lease = self.by_id.get(lid)
        if lease is None:
            raise Conflict("unknown or expired write lease; start the write again")
        lease.expires = self.clock() + self.seconds
        return lease

    def drop(self, lid: str, committed: frozenset[int] = frozenset()) -> None:
        """End lease ``lid``; its placed chunks outside ``committed`` are abandoned."""
        lease = self.by_id.pop(lid, None)
        if lease is None:
            return
        if self.by_path.get(lease.path) == lid:
            del self.by_path[lease.path]
        # a copy reported while the lease held it is never reported again: abandon it explicitly
        for h, ids in lease.allocated.items():
            if h not in committed:
                self.on_abandon(h, ids)

    def expire(self) -> None:
        now = self.clock()
        for lid, lease in list(self.by_id.items()):
            if lease.expires < now:
                self.drop(lid)

    def check_none_below(self, path: str) -> None:
        """Conflict if a file at or below ``path`` is being written (rm, mv, restore in place)."""
        self.expire()
        pre = paths.split(path)
        for p in self.by_path:
            if paths.is_within(paths.split(p), pre):
                raise Conflict(f"{p} is being written; try again when the write finishes")

    def allocated(self, h: int) -> bool:
        """A lease placed this chunk (or cloned it for an append) and has not committed yet."""
        return any(h in lease.allocated or lease.inplace == h for lease in self.by_id.values())

    def being_written(self, h: int) -> bool:
        """An open lease appends to this chunk in place: a copy taken now could miss bytes that
        are about to be acknowledged."""
        return any(lease.inplace == h for lease in self.by_id.values())
