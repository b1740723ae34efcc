"""Cluster identity: which chunkservers belong to this master, and when a master must refuse.

The master's data directory holds ``cluster.json``: the cluster id made when the directory was
formatted. A chunkserver records the id on its first registration and reports it with every
heartbeat; master and chunkserver refuse each other when the ids differ (HDFS's clusterID).

A master that finds its directory empty formats it *provisionally*: the id is confirmed by the
first chunkserver that registers without an id of its own (a new cluster), by ``--format`` or by
``kubegfs master recover``. If instead a chunkserver of another cluster registers with a
provisional master, the master's volume was most likely lost: the master enters the *refusing*
state, persisted in ``cluster.json`` so a restart keeps it, in which it accepts no chunkserver and
no mutation and deletes nothing, until an operator runs ``kubegfs master recover`` (adopt that
cluster's metadata) or restarts it with ``--format`` (start a new cluster on purpose).

Invariant: a master never sends a delete to a chunkserver whose cluster id differs from its own,
and a chunkserver never acts on an answer from a master of another cluster.
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write

IDENTITY_FILE = "cluster.json"


def new_cluster_id() -> str:
    return "kgfs-" + uuid.uuid4().hex


@dataclass
class Refusal:
    """Why a provisional master stopped: a chunkserver of ``cluster_id`` holds data."""

    cluster_id: str
    chunkserver: str
    since_ns: int


@dataclass
class ClusterIdentity:
    cluster_id: str
    created_ns: int
    provisional: bool = False
    refusing: Refusal | None = None
    history: str = field(default_factory=lambda: uuid.uuid4().hex)  # the op log's lineage (metareplica)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClusterIdentity:
        ref = d.get("refusing")
        return cls(str(d["cluster_id"]), int(d.get("created_ns", 0)), bool(d.get("provisional", False)),
                   Refusal(**ref) if isinstance(ref, dict) else None, str(d.get("history") or uuid.uuid4().hex))


def load(data_dir: Path) -> ClusterIdentity | None:
    p = data_dir / IDENTITY_FILE
    if not p.exists():
        return None
    raw = json.loads(p.read_text())
    ident = ClusterIdentity.from_json(raw)
    if not raw.get("history"):
        save(data_dir, ident)  # an identity from before metadata replication: fix its lineage now
    return ident


def save(data_dir: Path, ident: ClusterIdentity) -> None:
    atomic_write(data_dir / IDENTITY_FILE, json.dumps(ident.to_json(), sort_keys=True).encode())


def has_namespace(data_dir: Path) -> bool:
    """The directory holds an op log or a checkpoint (a formatted, used master)."""
    return any(data_dir.glob("log-*.wal")) or any(data_dir.glob("checkpoint-*.ckpt"))


def open_identity(data_dir: Path, format_now: bool = False) -> ClusterIdentity:
    """The identity of the master's directory, creating it when missing.

    ``format_now`` (``--format``) confirms a provisional or refusing directory as a new cluster;
    on a confirmed one it changes nothing. Call before the op log is opened."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ident = load(data_dir)
    if ident is None:
        # a directory with a namespace but no identity predates cluster ids: confirm it as is
        ident = ClusterIdentity(new_cluster_id(), time.time_ns(),
                                provisional=not format_now and not has_namespace(data_dir))
        save(data_dir, ident)
    elif format_now and (ident.provisional or ident.refusing):
        ident = ClusterIdentity(new_cluster_id(), time.time_ns())
        save(data_dir, ident)
    return ident


class Verdict(enum.Enum):
    ACCEPT = "accept"  # same cluster
    ASSIGN = "assign"  # a chunkserver without an id: it joins this cluster
    REFUSE = "refuse"  # another cluster's chunkserver
    HOLD = "hold"  # another cluster's chunkserver met a provisional master: enter refusing


def judge(ident: ClusterIdentity, cs_cluster_id: str) -> Verdict:
    """What a master does with a registering chunkserver (pure)."""
    if ident.refusing is not None:
        return Verdict.REFUSE
    if cs_cluster_id == ident.cluster_id:
        return Verdict.ACCEPT
    if not cs_cluster_id:
        return Verdict.ASSIGN
    return Verdict.HOLD if ident.provisional else Verdict.REFUSE


@dataclass
class ForeignChunkserver:
    """A chunkserver the master refused, remembered so ``recover`` knows where to look."""

    id: str
    address: str
    cluster_id: str
    chunks: int
    records: int
    max_incarnation: int  # the highest incarnation among its chunk handles
    location: dict[str, str] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["last_seen_seconds_ago"] = round(time.monotonic() - d.pop("last_seen"), 3)
        return d


def refusal_message(ident: ClusterIdentity, cs_id: str, cs_cluster_id: str) -> str:
    if ident.refusing is not None:
        return (f"master refuses every chunkserver: its data directory was empty but chunkserver "
                f"{ident.refusing.chunkserver} holds data of cluster {ident.refusing.cluster_id}; "
                f"run `kubegfs master recover` to adopt that cluster, or restart the master with "
                f"--format to start a new one (nothing was deleted)")
    return (f"chunkserver {cs_id} belongs to cluster {cs_cluster_id}, this master to cluster "
            f"{ident.cluster_id}; refused (nothing was deleted). Point it at its own master, or wipe "
            f"its data directory to let it join this cluster")


def condition(ident: ClusterIdentity, foreign: int) -> dict[str, Any]:
    """A Kubernetes-style status condition about the identity."""
    if ident.refusing is not None:
        return {"type": "ClusterIdentity", "status": "False", "reason": "LostMetadataSuspected",
                "message": refusal_message(ident, "", "")}
    if foreign:
        return {"type": "ClusterIdentity", "status": "True", "reason": "ForeignChunkserversRefused",
                "message": f"{foreign} chunkserver(s) of another cluster refused"}
    reason = "Provisional" if ident.provisional else "Confirmed"
    return {"type": "ClusterIdentity", "status": "True", "reason": reason,
            "message": f"cluster {ident.cluster_id}"}
