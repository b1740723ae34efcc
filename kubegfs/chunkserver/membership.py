"""A chunkserver's side of cluster identity (see master/identity.py).

The chunkserver records the master's cluster id on its first accepted registration (durably, in
``identity.json`` beside its id) and from then on refuses any master of another cluster: it acts on
no answer of one (no delete is ever carried out) and answers its internal requests with 409.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from .. import metrics as M
from ..errors import ClusterMismatch
from ..fsutil import atomic_write
from ..web import CLUSTER_HEADER

log = logging.getLogger("kubegfs.chunkserver")



class Membership:
    def __init__(self, ident_path: Path) -> None:
        self.path = ident_path
        saved: dict[str, Any] = json.loads(ident_path.read_text()) if ident_path.exists() else {}
        self.saved = saved
        self.cluster_id: str = str(saved.get("cluster_id") or "")
        self.refused = ""  # why the master refuses us (or we it); "" when fine

    def save(self, **fields: Any) -> None:
        self.saved.update(fields)
        if self.cluster_id:
            self.saved["cluster_id"] = self.cluster_id
        atomic_write(self.path, json.dumps(self.saved, sort_keys=True).encode())

    def accept_reply(self, reply: dict[str, Any]) -> bool:
        """An answer from the master: True if we may act on it. Records the id on first contact."""
        master_cluster = reply.get("cluster_id")
        if not isinstance(master_cluster, str) or not master_cluster:
            return True  # a master that predates cluster ids
        if not self.cluster_id:
            self.cluster_id = master_cluster
            self.save()
            log.info("joined cluster %s", master_cluster)
        if master_cluster != self.cluster_id:
            self._refuse(f"master belongs to cluster {master_cluster}, this chunkserver to "
                         f"{self.cluster_id}; its answers are ignored (nothing is deleted)")
            return False
        if self.refused:
            log.info("master accepts this chunkserver again (cluster %s)", self.cluster_id)
        self.refused = ""
        return True

    def refused_by_master(self, message: str) -> None:
        self._refuse(f"refused by the master: {message}")

    def _refuse(self, why: str) -> None:
        M.CS_CLUSTER_REFUSALS.inc()
        if why != self.refused:  # once per change, not once per heartbeat
            log.error("%s", why)
        self.refused = why

    def check_caller(self, theirs: str) -> None:
        """Refuse a call that names another cluster (``theirs``: its CLUSTER_HEADER, or "")."""
        if theirs and self.cluster_id and theirs != self.cluster_id:
            M.CS_CLUSTER_REFUSALS.inc()
            raise ClusterMismatch(f"this chunkserver belongs to cluster {self.cluster_id}, the "
                                  f"caller to {theirs}; refused")

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def same_cluster(request: web.Request, handler: Any) -> web.StreamResponse:
            self.check_caller(request.headers.get(CLUSTER_HEADER, ""))
            return await handler(request)

        return same_cluster
