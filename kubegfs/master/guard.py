"""The master's guard against deleting what it does not know: cluster identity + safe mode.

``Master`` owns one ``Guard`` and consults it at three points: every heartbeat goes through
``admit`` first (a chunkserver of another cluster is refused before anything is read from its
report), the deletion gate (``outbox.py``) holds every order while ``hold_reason`` gives one
(safe mode, refusing), and mutating client requests pass the middleware (a refusing master
changes nothing). Pure decisions live in ``identity`` and
``safemode``; this module keeps their state for one master process and exports it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import metrics as M
from ..errors import ClusterMismatch, InvalidArgument, Unavailable
from . import identity as idn
from .safemode import SafeMode, SafeModeConfig

log = logging.getLogger("kubegfs.master.guard")

# requests a refusing master still serves: reads, and the way out
_ALWAYS_ALLOWED = ("/api/v1/admin/recover",)


class Guard:
    def __init__(self, data_dir: Path, ident: idn.ClusterIdentity, safe: SafeModeConfig) -> None:
        self.data_dir = data_dir
        self.ident = ident
        self.safe_cfg = safe
        self.safemode = SafeMode(safe, time.monotonic())
        self.foreign: dict[str, idn.ForeignChunkserver] = {}
        self.waiting: Callable[[], int] = lambda: 0  # deletion orders queued in the gate (outbox.py)
        self.recovering = False
        if ident.refusing is not None:
            log.error("%s", idn.refusal_message(ident, "", ""))

    # ------------------------------------------------------------------ identity

    @property
    def cluster_id(self) -> str:
        return self.ident.cluster_id

    def reply(self) -> dict[str, Any]:
        """Fields every heartbeat answer carries."""
        return {"cluster_id": self.ident.cluster_id}

    def admit(self, cid: str, address: str, body: Mapping[str, Any]) -> None:
        """Let a heartbeat through, or raise ``ClusterMismatch`` (nothing of it is used)."""
        cs_cluster = body.get("cluster_id") or ""
        if not isinstance(cs_cluster, str) or len(cs_cluster) > 128:
            raise InvalidArgument("cluster_id must be a string")
        chunks = body.get("chunks") if body.get("full") else None
        has_data = bool(chunks) or bool(body.get("records"))
        verdict = idn.judge(self.ident, cs_cluster)
        if verdict is idn.Verdict.ASSIGN and self.ident.provisional and has_data:
            verdict = idn.Verdict.HOLD  # an id-less chunkserver with data: as suspicious
        if verdict is idn.Verdict.ACCEPT:
            self.foreign.pop(cid, None)
            return
        if verdict is idn.Verdict.ASSIGN:
            if self.ident.provisional:
                self.ident.provisional = False
                idn.save(self.data_dir, self.ident)
                log.info("cluster %s confirmed: chunkserver %s joined it new", self.cluster_id, cid)
            self.foreign.pop(cid, None)
            return
        if verdict is idn.Verdict.HOLD:
            self.ident.refusing = idn.Refusal(cs_cluster or "(none)", cid, time.time_ns())
            idn.save(self.data_dir, self.ident)
            log.error("%s", idn.refusal_message(self.ident, cid, cs_cluster))
        self._remember_foreign(cid, address, cs_cluster, body)
        M.M_CLUSTER_REFUSALS.inc()
        raise ClusterMismatch(idn.refusal_message(self.ident, cid, cs_cluster),
                              cluster_id=self.ident.cluster_id, refusing=self.ident.refusing is not None)

    def _remember_foreign(self, cid: str, address: str, cs_cluster: str, body: Mapping[str, Any]) -> None:
        prev = self.foreign.get(cid)
        chunks = body.get("chunks") if body.get("full") else None
        if isinstance(chunks, list):
            incs = [_incarnation(it[0]) for it in chunks if isinstance(it, list) and it]
            max_inc, n = max(incs, default=0), len(chunks)
        else:
            max_inc, n = (prev.max_incarnation, prev.chunks) if prev else (0, 0)
        records = body.get("records")
        n_rec = len(records) if isinstance(records, list) else 0
        if prev is None or prev.cluster_id != cs_cluster:
            log.error("refused chunkserver %s at %s: it belongs to cluster %s, this master to %s",
                      cid, address, cs_cluster or "(none)", self.cluster_id)
        loc = body.get("location")
        loc = {k: str(v) for k, v in loc.items() if k in ("node", "zone", "region")} if isinstance(loc, dict) else {}
        self.foreign[cid] = idn.ForeignChunkserver(cid, address, cs_cluster, n, n_rec, max_inc, loc)

    def adopt(self, cluster_id: str, history: str) -> None:
        """``recover`` finished: this master now is ``cluster_id``'s master, its op log continues
        ``history`` (the metadata copy's) or starts a new one."""
        self.ident = idn.ClusterIdentity(cluster_id, time.time_ns(), history=history)
        idn.save(self.data_dir, self.ident)
        self.foreign = {k: v for k, v in self.foreign.items() if v.cluster_id != cluster_id}
        self.restart_safe_mode()

    @property
    def refusing(self) -> bool:
        return self.ident.refusing is not None

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def refuse_mutations(request: web.Request, handler: Any) -> web.StreamResponse:
            self.check(request.method, request.path)
            return await handler(request)

        return refuse_mutations

    def check(self, method: str, path: str) -> None:
        """Unavailable for an API call that may change something while the master refuses."""
        if self.refusing and method not in ("GET", "HEAD") and path.startswith("/api/") and path not in _ALWAYS_ALLOWED:
            raise Unavailable(idn.refusal_message(self.ident, "", ""))

    # ------------------------------------------------------------------ safe mode

    def restart_safe_mode(self) -> None:
        self.safemode = SafeMode(self.safe_cfg, time.monotonic())

    def hold_reason(self) -> str | None:
        """Why every deletion must wait now, or None: the hold predicate for the master's
        deletion gate (``outbox.holds.append(guard.hold_reason)``)."""
        if self.refusing:
            return "refusing: the data directory was empty while chunkservers hold data"
        if self.safemode.holds():
            return f"safe mode: {self.safemode.reason}"
        return None

    def holds(self) -> bool:
        return self.hold_reason() is not None

    def tick(self, known: Collection[int], locations: Mapping[int, set[str]]) -> None:
        """Count reported chunks while in safe mode (only then), walking the smaller side: the
        few chunks reported so far while reports come in (a walk of a big chunk table on every
        tick would hold the event loop each time: 1M chunks, ~30 ms), all of them only at the end."""
        if not self.safemode.on:
            return
        n = len(known)
        if len(locations) < n:
            reported = sum(1 for h, ids in locations.items() if ids and h in known)
        else:
            reported = sum(1 for h in known if locations.get(h))
        if self.safemode.update(reported, n, time.monotonic()):
            log.info("safe mode off after %.1fs: %s", self.safemode.left_after, self.safemode.reason)

    # ------------------------------------------------------------------ reporting

    def conditions(self) -> list[dict[str, Any]]:
        return [idn.condition(self.ident, len(self.foreign)), self.safemode.condition()]

    def status(self) -> dict[str, Any]:
        return {
            "cluster_id": self.ident.cluster_id, "provisional": self.ident.provisional,
            "refusing": self.ident.refusing.__dict__ if self.ident.refusing else None,
            "foreign_chunkservers": [f.to_json() for f in self.foreign.values()],
            "safe_mode": self.safemode.status(time.monotonic()), "deletions_held": self.held(),
        }

    def held(self) -> int:
        return self.waiting() if self.holds() else 0

    def update_gauges(self) -> None:
        M.M_DELETIONS_HELD.set(self.held())
        M.M_SAFE_MODE.set(1 if self.safemode.on else 0)
        M.M_SAFE_MODE_RATIO.set(self.safemode.ratio())
        M.M_REFUSING.set(1 if self.refusing else 0)
        M.M_FOREIGN_CS.set(len(self.foreign))


def _incarnation(handle: Any) -> int:
    try:
        return int(str(handle), 16) >> 32
    except ValueError:
        return 0
