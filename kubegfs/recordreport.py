"""A chunkserver's snapshot records as its heartbeats report them: in full, or as what changed
since a report the master took, so that a heartbeat costs O(records changed), not O(records held)
(back-to-back snapshots add a record to each of two holders several times a second).

A full report: ``records`` (ids), ``record_digests`` ({id: [size, sha256]}) and ``records_seq``
(the chunkserver's count of its reports). A report of changes: ``records_seq``, ``records_base``
(the seq of the report it follows), ``records_changed`` ({id: [size, sha256]}: new, or not as in
that report) and ``records_gone`` (ids in that report, not here now).

The master folds changes only onto the report numbered ``records_base`` (the last it took from
that chunkserver); otherwise it checks nothing and asks for a full report (``records_full`` in
its reply). A master that takes changes says ``records_delta`` in every reply; to any other the
chunkserver reports in full, as it does after any heartbeat that was not answered so, when it
(re-)registers, and every ``FULL_EVERY`` reports (the master then checks every copy again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidArgument

Digests = dict[str, list[int | str]]  # record id -> [size, sha256 its sidecar claims]

FULL_EVERY = 60  # a full report every this many (30 s at the local cluster's 0.5 s heartbeat)
# the chunkserver passes over its records directory (a stat per file) for every this many
# reports, and reports the records it stored and deleted itself in between: a copy damaged from
# outside (truncated, replaced, removed) shows within this many heartbeats (5 s at 0.5 s)
RECORD_SCAN_EVERY = 10


def changes(base: Digests, now: Digests) -> tuple[Digests, list[str]]:
    """What ``now`` has that ``base`` has not (or not alike), and the ids ``base`` has that ``now`` lacks."""
    return {r: d for r, d in now.items() if base.get(r) != d}, sorted(r for r in base if r not in now)


@dataclass
class Reporter:
    """The chunkserver's side: which report the next heartbeat carries."""

    seq: int = 0
    base: tuple[int, Digests] | None = None  # the last report the master took, if it takes changes

    def report(self, now: Digests, full: bool = False) -> dict[str, Any]:
        """The heartbeat's fields for the records ``now`` (``full``: a full report however)."""
        self.seq += 1
        base, self.base = self.base, None  # until the master answers this one (``answered``)
        if full or base is None or self.seq % FULL_EVERY == 0:
            return {"records": sorted(now), "record_digests": now, "records_seq": self.seq}
        changed, gone = changes(base[1], now)
        return {"records_seq": self.seq, "records_base": base[0], "records_changed": changed,
                "records_gone": gone}

    def answered(self, sent: dict[str, Any], now: Digests, reply: dict[str, Any]) -> None:
        """The master answered the heartbeat that carried ``sent`` (made from ``now``). Until a
        heartbeat is answered so, the next report is a full one: the master may have taken an
        unanswered one or not."""
        if reply.get("records_delta") is True and not reply.get("records_full"):
            self.base = (int(sent["records_seq"]), now)


@dataclass
class RecordView:
    """The master's side: the records one chunkserver reported, as of its report ``seq``."""

    seq: int | None = None
    digests: Digests = field(default_factory=dict)

    def fold(self, b: dict[str, Any]) -> tuple[Literal["full", "changes", "stale"], set[str]]:
        """Take a heartbeat's report: ``("full", every id)``, ``("changes", the ids it names)``,
        or ``("stale", ∅)`` for changes that do not follow the report taken last (nothing
        taken: the reply asks for a full report). InvalidArgument for a malformed one."""
        seq = b.get("records_seq")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool)):
            raise InvalidArgument("records_seq must be an integer")
        if "records_changed" not in b:  # a full report (or a chunkserver that only makes those)
            records = b.get("records") or []
            digests = b.get("record_digests") or {}
            if not isinstance(records, list):
                raise InvalidArgument("records must be a list")
            if not isinstance(digests, dict):
                raise InvalidArgument("record_digests must be an object {id: [size, sha256]}")
            self.digests = {r: _digest(digests.get(r)) for r in records if isinstance(r, str)}
            self.seq = seq
            return "full", set(self.digests)
        changed, gone, base = b.get("records_changed"), b.get("records_gone") or [], b.get("records_base")
        if not isinstance(changed, dict) or not isinstance(gone, list) or seq is None:
            raise InvalidArgument("records_changed must be an object {id: [size, sha256]}, records_gone "
                                  "a list, with records_seq")
        if self.seq is None or base != self.seq:
            return "stale", set()
        for r in gone:
            if isinstance(r, str):
                self.digests.pop(r, None)
        for r, d in changed.items():
            self.digests[r] = _digest(d)
        self.seq = seq
        return "changes", {r for r in gone if isinstance(r, str)} | set(changed)


def _digest(d: Any) -> list[int | str]:
    """A reported [size, sha256] as given, or [] (not checked) if it is not one."""
    return d if isinstance(d, list) and len(d) == 2 else []
