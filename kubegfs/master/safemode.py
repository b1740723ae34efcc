"""Safe mode: after every start the master deletes nothing until it has heard enough.

A freshly started master knows its chunk table from the log but not yet where the replicas are.
Until ``threshold`` of the chunks it knows have at least one reported replica, or ``grace_seconds``
have passed, every deletion (garbage, stale or short replicas, orphaned snapshot records) and
re-replication is held. Held deletions are not lost: they wait in the master's deletion gate
(``outbox.py``, whose hold predicate this feeds) and are re-checked when they are released. Once left, safe mode stays off until the next start
(or until ``recover`` rebuilds the namespace).

Pure: the caller passes the counts and the clock; nothing here touches a server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SafeModeConfig:
    threshold: float = 0.999  # share of known chunks with a reported replica (HDFS's default)
    grace_seconds: float = 30.0  # leave after this long even if chunks are still missing


class SafeMode:
    def __init__(self, cfg: SafeModeConfig, now: float) -> None:
        self.cfg = cfg
        self.started = now
        self.on = True
        self.reason = "starting"
        self.known = 0
        self.reported = 0
        self.left_after = 0.0

    def holds(self) -> bool:
        """The hold predicate: True while deletions must wait."""
        return self.on

    def ratio(self) -> float:
        return 1.0 if self.known == 0 else self.reported / self.known

    def update(self, reported: int, known: int, now: float) -> bool:
        """Feed the current counts; True exactly when this call ends safe mode."""
        if not self.on:
            return False
        self.reported, self.known = reported, known
        if known == 0:
            return self._leave("no chunks to wait for", now)
        if self.ratio() >= self.cfg.threshold:
            return self._leave(f"{reported} of {known} chunks reported", now)
        if now - self.started >= self.cfg.grace_seconds:
            return self._leave(f"grace period of {self.cfg.grace_seconds:g}s passed with "
                               f"{reported} of {known} chunks reported", now)
        self.reason = f"waiting: {reported} of {known} chunks reported"
        return False

    def leave(self, why: str, now: float) -> bool:
        """An operator's explicit exit."""
        return self._leave(why, now) if self.on else False

    def _leave(self, why: str, now: float) -> bool:
        self.on = False
        self.reason = why
        self.left_after = now - self.started
        return True

    def status(self, now: float) -> dict[str, Any]:
        return {
            "on": self.on, "reason": self.reason, "reported_chunks": self.reported,
            "known_chunks": self.known, "reported_ratio": round(self.ratio(), 6),
            "threshold": self.cfg.threshold, "grace_seconds": self.cfg.grace_seconds,
            "seconds": round((now - self.started) if self.on else self.left_after, 3),
        }

    def condition(self) -> dict[str, Any]:
        return {"type": "SafeMode", "status": "True" if self.on else "False",
                "reason": "WaitingForReports" if self.on else "Left", "message": self.reason}
