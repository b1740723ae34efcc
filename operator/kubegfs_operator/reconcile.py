"""What the handlers do, as plain functions over injected dependencies (so tests can drive them).

Each function returns a ``Result`` (status to write, event to post, metrics to record) or raises
``Retry`` (try again after a delay, with a Progressing status) or ``Fail`` (a permanent failure,
with a Failed status). ``main`` turns these into kopf's TemporaryError / PermanentError.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from kubegfs.client import Client
from kubegfs.errors import AlreadyExists, Conflict, InvalidArgument, KubegfsError, NotFound

from . import objects
from .api import (
    SpecError,
    kubegfs_restore_id,
    kubegfs_snapshot_id,
    kubegfs_snapshot_name,
    parse_restore,
    parse_snapshot,
)
from .cluster import ClusterView
from .config import Config


@dataclass
class Result:
    status: dict[str, Any]
    event: tuple[str, str, str] | None = None  # (type, reason, message)
    metrics: dict[str, float] = field(default_factory=dict)


class Retry(Exception):
    def __init__(self, status: dict[str, Any], message: str, delay: float,
                 event: tuple[str, str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.delay, self.event = status, delay, event


class Fail(Exception):
    def __init__(self, status: dict[str, Any], message: str, reason: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


def backoff(retry: int, base: float = 1.0, cap: float = 30.0) -> float:
    return min(cap, base * (2 ** min(retry, 10)))


@dataclass
class Deps:
    cfg: Config
    view: Callable[[Any], ClusterView]                # ClusterRef -> view
    master: Callable[[str], Client]                   # url -> client
    get_snapshot: Callable[[str, str], dict[str, Any] | None]  # (namespace, name) -> object or None


def _meta(body: dict[str, Any]) -> tuple[str, str, str, int]:
    m = body["metadata"]
    return m["namespace"], m["name"], m["uid"], int(m.get("generation") or 1)


# ----------------------------------------------------------------------------- snapshots


def snapshot(body: dict[str, Any], retry: int, started: float, d: Deps) -> Result:
    ns, name, uid, gen = _meta(body)
    status = body.get("status") or {}
    conds = status.get("conditions")
    try:
        spec = parse_snapshot(body.get("spec") or {}, ns, d.cfg.default_cluster, d.cfg.default_namespace)
    except SpecError as exc:
        raise Fail(objects.failed(conds, gen, "InvalidSpec", str(exc)), str(exc), "InvalidSpec") from exc
    view = d.view(spec.cluster)
    where = f"kubegfs installation {spec.cluster.name!r} in namespace {spec.cluster.namespace!r}"
    if view.master is None:
        msg = f"no ready master pod of the {where}"
        raise Retry(objects.progressing(conds, gen, "MasterUnavailable", msg), msg, backoff(retry, 2))
    ranked = view.rank(spec.copies)
    if not ranked:
        msg = f"no ready chunkserver pod in the {where}"
        raise Retry(objects.progressing(conds, gen, "NoChunkservers", msg), msg, backoff(retry, 2))
    reasons = {r.candidate.location.ip: r.reason for r in ranked}
    req = {
        "id": kubegfs_snapshot_id(uid),
        "name": kubegfs_snapshot_name(ns, name, uid),
        "path": spec.path,
        "copies": spec.copies,
        "targets": [r.candidate.location.ip for r in ranked],
        "near": view.master.location.to_json(),
        "labels": {"kubernetes.namespace": ns, "kubernetes.name": name, "kubernetes.uid": uid},
    }
    client = d.master(view.master.url)
    try:
        # long poll: a small snapshot comes back ready in this call; a big one says pending
        snap = client.api("POST", "/snapshots", json=req, params={"wait": "2"})
    except (NotFound, InvalidArgument, AlreadyExists) as exc:
        reason = {NotFound: "PathNotFound", InvalidArgument: "InvalidSpec"}.get(type(exc), "NameConflict")
        raise Fail(objects.failed(conds, gen, reason, exc.message), exc.message, reason) from exc
    except Conflict as exc:
        raise Fail(objects.failed(conds, gen, "NameConflict", exc.message), exc.message, "NameConflict") from exc
    except KubegfsError as exc:
        msg = f"master {view.master.name} at {view.master.url} unreachable or failing: {exc.message}"
        raise Retry(objects.progressing(conds, gen, "MasterUnreachable", msg), msg, backoff(retry)) from exc
    finally:
        client.close()
    if snap["state"] == "pending":
        msg = f"captured {spec.path}; building and shipping the record to {ranked[0].candidate.id}"
        first = retry == 0
        raise Retry(objects.progressing(conds, gen, "Shipping", msg), msg, 0.5 if retry < 10 else 2.0,
                    event=("Normal", "CreatingSnapshot", msg) if first else None)
    if snap["state"] == "failed":
        msg = f"snapshot failed on the master: {snap.get('error')}"
        raise Fail(objects.failed(conds, gen, "SnapshotFailed", msg), msg, "SnapshotFailed")
    duration = max(0.0, time.time() - started)
    st = objects.snapshot_ready_status(conds, gen, snap, duration, view.pods_by_ip(), reasons)
    loc = st["location"]
    msg = (f"snapshot of {spec.path} ready: {snap['files']} files, {snap['logical_bytes']} bytes; "
           f"record on {loc['pod'] or loc['chunkserver']} (node {loc['node']}, zone {loc['zone']}, {loc['reason']})")
    return Result(st, ("Normal", "SnapshotCreated", msg), {
        "size": snap["logical_bytes"], "record": snap["record_bytes"], "duration": duration,
    })


def snapshot_delete(body: dict[str, Any], retry: int, d: Deps) -> str:
    """Returns what happened; raises Retry to keep the finalizer for now."""
    ns, name, uid, gen = _meta(body)
    spec = body.get("spec") or {}
    if spec.get("deletionPolicy", "Delete") == "Retain":
        return "retained: the record and its chunks are kept"
    status = body.get("status") or {}
    sid = status.get("snapshotID") or kubegfs_snapshot_id(uid)
    try:
        ref = parse_snapshot(spec, ns, d.cfg.default_cluster, d.cfg.default_namespace).cluster
    except SpecError:
        return "nothing to delete: the spec was never valid"
    view = d.view(ref)
    if view.master is None:
        if retry >= d.cfg.delete_give_up_after:
            return f"gave up after {retry} attempts: no master; snapshot {sid} may remain in kubegfs"
        raise Retry(status, "no ready master pod to delete the snapshot", backoff(retry, 2))
    client = d.master(view.master.url)
    try:
        client.api("DELETE", f"/snapshots/{quote(sid, safe='')}")
        return f"deleted snapshot {sid} and released its chunks"
    except NotFound:
        return f"snapshot {sid} was already gone"
    except Conflict as exc:
        raise Retry(status, exc.message, 1.0) from exc
    except KubegfsError as exc:
        if retry >= d.cfg.delete_give_up_after:
            return f"gave up after {retry} attempts ({exc.message}); snapshot {sid} may remain in kubegfs"
        raise Retry(status, f"master unreachable: {exc.message}", backoff(retry)) from exc
    finally:
        client.close()


# ----------------------------------------------------------------------------- restores


def _created(body: dict[str, Any]) -> float:
    ts = body["metadata"].get("creationTimestamp")
    if not ts:
        return time.time()
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def _cond(obj: dict[str, Any], ctype: str) -> str:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype:
            return str(c.get("status"))
    return "Unknown"


def restore(body: dict[str, Any], retry: int, started: float, d: Deps, now: float | None = None) -> Result:
    ns, name, uid, gen = _meta(body)
    conds = (body.get("status") or {}).get("conditions")
    try:
        spec = parse_restore(body.get("spec") or {})
    except SpecError as exc:
        raise Fail(objects.failed(conds, gen, "InvalidSpec", str(exc)), str(exc), "InvalidSpec") from exc
    now = time.time() if now is None else now
    deadline = _created(body) + spec.timeout_seconds
    snap_obj = d.get_snapshot(ns, spec.snapshot_name)
    if snap_obj is None or _cond(snap_obj, "Ready") != "True":
        if snap_obj is not None and _cond(snap_obj, "Failed") == "True":
            msg = f"Snapshot {spec.snapshot_name} failed; nothing to restore"
            raise Fail(objects.failed(conds, gen, "SnapshotFailed", msg), msg, "SnapshotFailed")
        what = "does not exist" if snap_obj is None else "is not Ready"
        if now >= deadline:
            msg = f"Snapshot {spec.snapshot_name} {what} after {spec.timeout_seconds}s; giving up"
            raise Fail(objects.failed(conds, gen, "SnapshotNotReady", msg), msg, "SnapshotNotReady")
        msg = f"waiting for Snapshot {spec.snapshot_name}: it {what} yet"
        raise Retry(objects.progressing(conds, gen, "WaitingForSnapshot", msg), msg,
                    min(backoff(retry, 1, 10), max(1.0, deadline - now)))
    snap_status = snap_obj.get("status") or {}
    try:
        ref = parse_snapshot(snap_obj.get("spec") or {}, ns, d.cfg.default_cluster, d.cfg.default_namespace).cluster
    except SpecError as exc:
        raise Fail(objects.failed(conds, gen, "InvalidSnapshot", str(exc)), str(exc), "InvalidSnapshot") from exc
    view = d.view(ref)
    if view.master is None:
        msg = f"no ready master pod of kubegfs installation {ref.name!r}"
        raise Retry(objects.progressing(conds, gen, "MasterUnavailable", msg), msg, backoff(retry, 2))
    req: dict[str, Any] = {"id": kubegfs_restore_id(uid)}
    if spec.target_path is not None:
        req["to"] = spec.target_path
    client = d.master(view.master.url)
    sid = snap_status.get("snapshotID") or ""
    try:
        result = client.api("POST", f"/snapshots/{quote(sid, safe='')}/restore", json=req)
    except (AlreadyExists, NotFound, InvalidArgument) as exc:
        reason = {AlreadyExists: "TargetExists", NotFound: "NotFound"}.get(type(exc), "InvalidSpec")
        raise Fail(objects.failed(conds, gen, reason, exc.message), exc.message, reason) from exc
    except Conflict as exc:
        raise Retry(objects.progressing(conds, gen, "Busy", exc.message), exc.message, backoff(retry)) from exc
    except KubegfsError as exc:
        msg = f"master unreachable or failing: {exc.message}"
        raise Retry(objects.progressing(conds, gen, "MasterUnreachable", msg), msg, backoff(retry)) from exc
    finally:
        client.close()
    duration = max(0.0, time.time() - started)
    st = objects.restore_ready_status(conds, gen, result, duration, view.pods_by_ip())
    msg = f"restored Snapshot {spec.snapshot_name}: {result['files']} files to {result['path']} ({result['mode']})"
    return Result(st, ("Normal", "Restored", msg), {"duration": duration})
