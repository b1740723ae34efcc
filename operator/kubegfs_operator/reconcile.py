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
from . import schedule as sched
from .api import (
    SpecError,
    derived_name,
    kubegfs_restore_id,
    kubegfs_snapshot_id,
    kubegfs_snapshot_name,
    label_value,
    parse_restore,
    parse_snapshot,
)
from .cluster import ClusterView, PodInfo
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


@dataclass(frozen=True)
class Catalog:
    """The master's catalog of one installation as listed at ``listed_at`` (Unix time)."""

    listed_at: float
    entries: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Health:
    """The installation as its master reports it (``master_health``): ``ok`` False when a user
    must act or wait (``reason`` names the situation, ``message`` the way out)."""

    ok: bool
    reason: str
    message: str
    warning: bool = False  # a situation to act on (a Warning Event), not one that passes by itself

    @property
    def refusing(self) -> bool:
        """The master lost its metadata: its (empty) catalog says nothing about the snapshots."""
        return self.reason == LOST_METADATA


LOST_METADATA = "LostMetadataSuspected"
RECOVERY_DOC = "docs/recovery.md"


def master_health(status: dict[str, Any]) -> Health:
    """The installation's health from the master's ``GET /api/v1/status`` (pure). Worst first: a
    master refusing its chunkservers (lost metadata), chunkservers of another cluster refused,
    safe mode (nothing deleted until the chunkservers reported), metadata copies short."""
    conds = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, dict)}
    cluster = status.get("cluster") or {}
    ident = conds.get("ClusterIdentity") or {}
    if cluster.get("refusing") or ident.get("reason") == LOST_METADATA:
        msg = str(ident.get("message") or "the master's data directory was empty while chunkservers hold data")
        return Health(False, LOST_METADATA, f"{msg}; see {RECOVERY_DOC}", warning=True)
    if ident.get("reason") == "ForeignChunkserversRefused":
        ids = sorted(str(f.get("id", "?")) for f in cluster.get("foreign_chunkservers") or [] if isinstance(f, dict))
        return Health(False, "ForeignChunkserversRefused",
                      f"the master refuses chunkserver(s) of another cluster ({', '.join(ids) or '?'}); nothing "
                      f"was deleted: point them at their own master or wipe their data; see {RECOVERY_DOC}",
                      warning=True)
    safe = conds.get("SafeMode") or {}
    if safe.get("status") == "True":
        return Health(False, "SafeMode", f"safe mode: the master deletes nothing until the chunkservers have "
                                         f"reported ({safe.get('message', '')})")
    meta = conds.get("MetadataReplicated") or {}
    if meta.get("status") == "False" and meta.get("reason") == "Degraded":
        return Health(False, "MetadataCopiesDegraded",
                      f"fewer metadata copies in sync than configured: {meta.get('message', '')}")
    return Health(True, "Healthy", f"master serving cluster {cluster.get('cluster_id', '?')}")


def fetch_health(ref: Any, d: Deps) -> tuple[Health, PodInfo] | None:
    """Ask the installation's master for its status; None when there is none to ask."""
    view = d.view(ref)
    if view.master is None:
        return None
    client = d.master(view.master.url)
    try:
        return master_health(client.status()), view.master
    except KubegfsError:
        return None


def with_health(status: dict[str, Any], stored: Any, gen: int, health: Health | None) -> dict[str, Any]:
    """``status`` (to be written) with the ``ClusterHealthy`` condition brought up to date where
    it differs from the ``stored`` status (a healthy installation is not written onto objects
    that never had the condition)."""
    if health is None or not objects.cluster_health_changed(stored, health.ok, health.reason, health.message):
        return status
    return objects.with_cluster_health(status, gen, health.ok, health.reason, health.message)


def _refused(d: Deps, ref: Any, conds: Any, gen: int, retry: int) -> Retry | None:
    """The master refuses (lost metadata): a Retry that says so and what to do, or None."""
    health = d.health(ref)
    if health is None or not health.refusing:
        return None
    st = objects.with_cluster_health(objects.progressing(conds, gen, health.reason, health.message), gen,
                                     False, health.reason, health.message)
    return Retry(st, health.message, backoff(retry, 2))


@dataclass
class Deps:
    cfg: Config
    view: Callable[[Any], ClusterView]                # ClusterRef -> view
    master: Callable[[str], Client]                   # url -> the master's client (shared: never closed)
    get_snapshot: Callable[[str, str], dict[str, Any] | None]  # (namespace, name) -> object or None
    # (namespace, body) -> the object created, or the one already there under that name
    create_snapshot: Callable[[str, dict[str, Any]], dict[str, Any]] = lambda ns, body: body
    delete_snapshot: Callable[[str, str], None] = lambda ns, name: None  # gone already is fine
    list_snapshots: Callable[[str, str], list[dict[str, Any]]] = lambda ns, selector: []
    # ClusterRef -> the master's catalog (id -> entry), or None when it cannot be asked
    catalog: Callable[[Any], Catalog | None] = lambda ref: None
    # ClusterRef -> what the master's status says about the installation, or None (not asked)
    health: Callable[[Any], Health | None] = lambda ref: None


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
        "labels": {"kubernetes.kind": "Snapshot", "kubernetes.namespace": ns, "kubernetes.name": name,
                   "kubernetes.uid": uid},
    }
    client = d.master(view.master.url)
    try:
        # long poll: a small snapshot comes back ready in this call; a big one says pending
        snap = client.api("POST", "/snapshots", json=req, params={"wait": "2"})
    except InvalidArgument as exc:
        # the spec passed the same checks above: what the master rejects is what we derived
        msg = (f"the master rejected the operator's request ({exc.message}); this is a kubegfs-operator "
               "bug, not a problem with this Snapshot's spec")
        raise Fail(objects.failed(conds, gen, "RequestRejected", msg), msg, "RequestRejected") from exc
    except (NotFound, AlreadyExists) as exc:
        reason = "PathNotFound" if isinstance(exc, NotFound) else "NameConflict"
        raise Fail(objects.failed(conds, gen, reason, exc.message), exc.message, reason) from exc
    except Conflict as exc:
        raise Fail(objects.failed(conds, gen, "NameConflict", exc.message), exc.message, "NameConflict") from exc
    except KubegfsError as exc:
        refused = _refused(d, spec.cluster, conds, gen, retry)
        if refused is not None:
            raise refused from exc
        msg = f"master {view.master.name} at {view.master.url} unreachable or failing: {exc.message}"
        raise Retry(objects.progressing(conds, gen, "MasterUnreachable", msg), msg, backoff(retry)) from exc
    if snap["state"] == "pending":
        msg = f"captured {spec.path}; building and shipping the record to {ranked[0].candidate.id}"
        first = retry == 0
        raise Retry(objects.progressing(conds, gen, "Shipping", msg, objects.SHIPPING), msg, 0.5 if retry < 10 else 2.0,
                    event=("Normal", "CreatingSnapshot", msg) if first else None)
    if snap["state"] == "failed":
        msg = f"snapshot failed on the master: {snap.get('error')}"
        raise Fail(objects.failed(conds, gen, "SnapshotFailed", msg), msg, "SnapshotFailed")
    duration = max(0.0, time.time() - started)
    st = objects.healthy_again(objects.snapshot_ready_status(conds, gen, snap, duration, view.pods_by_ip(), reasons),
                               gen)
    loc = st["location"]
    msg = (f"snapshot of {spec.path} ready: {snap['files']} files, {snap['logical_bytes']} bytes; "
           f"record on {loc['pod'] or loc['chunkserver']} (node {loc['node']}, zone {loc['zone']}, {loc['reason']})")
    return Result(st, ("Normal", "SnapshotCreated", msg), {
        "size": snap["logical_bytes"], "record": snap["record_bytes"], "duration": duration,
    })


@dataclass(frozen=True)
class Deleted:
    """What deleting a Snapshot object did to its kubegfs snapshot."""

    message: str
    abandoned: bool = False
    """True when the operator gave up: the kubegfs snapshot may remain (a warning Event)."""


def snapshot_delete(body: dict[str, Any], retry: int, d: Deps) -> Deleted:
    """Raises Retry to keep the finalizer for now."""
    ns, name, uid, gen = _meta(body)
    spec = body.get("spec") or {}
    if spec.get("deletionPolicy", "Delete") == "Retain":
        return Deleted("retained: the record and its chunks are kept")
    status = body.get("status") or {}
    sid = status.get("snapshotID") or kubegfs_snapshot_id(uid)
    try:
        ref = parse_snapshot(spec, ns, d.cfg.default_cluster, d.cfg.default_namespace).cluster
    except SpecError:
        return Deleted("nothing to delete: the spec was never valid")
    view = d.view(ref)
    if view.master is None:
        if retry >= d.cfg.delete_give_up_after:
            return Deleted(f"gave up after {retry} attempts: no master; snapshot {sid} may remain in kubegfs", True)
        raise Retry(status, "no ready master pod to delete the snapshot", backoff(retry, 2))
    client = d.master(view.master.url)
    try:
        client.api("DELETE", f"/snapshots/{quote(sid, safe='')}")
        return Deleted(f"deleted snapshot {sid} and released its chunks")
    except NotFound:
        return Deleted(f"snapshot {sid} was already gone")
    except Conflict as exc:
        raise Retry(status, exc.message, 1.0) from exc
    except KubegfsError as exc:
        if retry >= d.cfg.delete_give_up_after:
            return Deleted(f"gave up after {retry} attempts ({exc.message}); snapshot {sid} may remain in kubegfs",
                           True)
        raise Retry(status, f"master unreachable: {exc.message}", backoff(retry)) from exc


def catalog_says_nothing(status: dict[str, Any]) -> bool:
    """The master's catalog proves nothing about what is gone (pure): it refuses (lost
    metadata), or its directory is new and no chunkserver has confirmed it yet (a master that
    lost its volume is in that state until the first chunkserver reports, then refuses)."""
    return master_health(status).refusing or bool((status.get("cluster") or {}).get("provisional"))


def fetch_catalog(ref: Any, d: Deps) -> Catalog | None:
    """List the master's catalog; None when it cannot be asked, or when its catalog says
    nothing (``catalog_says_nothing``)."""
    view = d.view(ref)
    if view.master is None:
        return None
    client = d.master(view.master.url)
    try:
        listed_at = time.time()
        if catalog_says_nothing(client.status()):
            return None
        return Catalog(listed_at, {e["id"]: e for e in client.api("GET", "/snapshots")["snapshots"]})
    except KubegfsError:
        return None


def snapshot_sync(body: dict[str, Any], d: Deps) -> Result | None:
    """One catalog: check a settled Snapshot against the master's catalog (``d.catalog``, one
    listing per installation shared by all objects). A Ready object whose kubegfs snapshot
    vanished turns SnapshotMissing; one that reappears turns Ready again. The installation's
    health (``d.health``) is kept in the ``ClusterHealthy`` condition; while the master refuses
    (lost metadata) its empty catalog proves nothing and no object is marked missing. None =
    nothing changed (also when the master cannot be asked right now)."""
    status = body.get("status") or {}
    gen = _meta(body)[3]
    try:
        ref = parse_snapshot(body.get("spec") or {}, body["metadata"]["namespace"], d.cfg.default_cluster,
                             d.cfg.default_namespace).cluster
    except SpecError:
        return None
    health = d.health(ref)
    res = None if health is not None and health.refusing else _catalog_check(body, ref, d)
    base = res.status if res is not None else {"conditions": status.get("conditions")}
    st = with_health(base, status, gen, health)
    if res is None and st is base:
        return None
    return Result(st, res.event if res is not None else None)


def _catalog_check(body: dict[str, Any], ref: Any, d: Deps) -> Result | None:
    gen = _meta(body)[3]
    status = body.get("status") or {}
    phase, reason = objects.phase_of(body), objects.reason_of(body)
    missing = phase == objects.FAILED and reason == "SnapshotMissing"
    sid = status.get("snapshotID")
    if not sid or not (phase == objects.READY or missing):
        return None
    catalog = d.catalog(ref)
    if catalog is None:
        return None
    snap = catalog.entries.get(sid)
    if snap is None:
        if missing or catalog.listed_at < _settled_at(body) + 1:
            return None  # a listing older than the object's outcome proves nothing
        st = objects.snapshot_missing(status.get("conditions"), gen, status.get("name", ""), sid)
        return Result(st, ("Warning", "SnapshotMissing", st["conditions"][0]["message"]))
    if not missing or snap.get("state") != "ready":
        return None
    msg = f"kubegfs snapshot {snap['name']} ({sid}) is in the master's catalog again"
    return Result(objects.ready(status.get("conditions"), gen, "SnapshotFound", msg), ("Normal", "SnapshotFound", msg))


def _settled_at(body: dict[str, Any]) -> float:
    for c in (body.get("status") or {}).get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == objects.READY and c.get("lastTransitionTime"):
            return objects.parse_time(c["lastTransitionTime"]).timestamp()
    return time.time()


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
            msg = f"Snapshot {spec.snapshot_name} failed ({objects.reason_of(snap_obj)}); nothing to restore"
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
    pre = ""
    if spec.target_path is None and spec.pre_restore_snapshot:
        pre = _pre_restore_snapshot(body, snap_obj, retry, d)
    view = d.view(ref)
    if view.master is None:
        msg = f"no ready master pod of kubegfs installation {ref.name!r}"
        raise Retry(objects.progressing(conds, gen, "MasterUnavailable", msg), msg, backoff(retry, 2))
    req: dict[str, Any] = {"id": kubegfs_restore_id(uid)}  # idempotent: a retry never restores twice
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
        refused = _refused(d, ref, conds, gen, retry)
        if refused is not None:
            raise refused from exc
        msg = f"master unreachable or failing: {exc.message}"
        raise Retry(objects.progressing(conds, gen, "MasterUnreachable", msg), msg, backoff(retry)) from exc
    duration = max(0.0, time.time() - started)
    st = objects.healthy_again(objects.restore_ready_status(conds, gen, result, duration, view.pods_by_ip()), gen)
    msg = f"restored Snapshot {spec.snapshot_name}: {result['files']} files to {result['path']} ({result['mode']})"
    if spec.target_path is None and spec.pre_restore_snapshot and not pre:
        st["preRestoreSnapshot"] = None  # nothing was at the path: clear the name shown while waiting
    if pre:
        st["preRestoreSnapshot"] = pre
        undo = f"; undo with a Restore of Snapshot {pre}"
        msg += undo
        st["conditions"] = [{**c, "message": c["message"] + undo} for c in st["conditions"]]
    return Result(st, ("Normal", "Restored", msg), {"duration": duration})


def _pre_restore_snapshot(body: dict[str, Any], snap_obj: dict[str, Any], retry: int, d: Deps) -> str:
    """Make sure a Snapshot of the restore's target exists and is Ready before an in-place
    restore replaces it; returns its name ("" when there was nothing at the path to keep).
    Raises Retry while it is being taken, Fail if it cannot be."""
    ns, name, uid, gen = _meta(body)
    conds = (body.get("status") or {}).get("conditions")
    snap_spec = snap_obj.get("spec") or {}
    path = snap_spec.get("path", "")
    pre_name = derived_name(name, "-pre-restore")
    pre = d.get_snapshot(ns, pre_name)
    if pre is None:
        pre = d.create_snapshot(ns, objects.pre_restore_snapshot(ns, pre_name, name, uid, path, snap_spec))
    if ((pre.get("metadata") or {}).get("annotations") or {}).get(objects.RESTORE_UID) != uid:
        msg = f"Snapshot {pre_name} exists and was not made by this Restore; delete it or opt out with preRestoreSnapshot: false"
        raise Fail(objects.failed(conds, gen, "NameConflict", msg), msg, "NameConflict")
    phase, reason = objects.phase_of(pre), objects.reason_of(pre)
    if phase == objects.READY:
        return pre_name
    if phase == objects.FAILED and reason == "PathNotFound":
        d.delete_snapshot(ns, pre_name)  # nothing at the target to keep: the restore creates it
        return ""
    if phase == objects.FAILED:
        msg = f"the pre-restore Snapshot {pre_name} of {path} failed ({reason}); not restoring over data it could not keep"
        raise Fail(objects.failed(conds, gen, "PreRestoreSnapshotFailed", msg), msg, "PreRestoreSnapshotFailed")
    msg = f"taking the pre-restore Snapshot {pre_name} of {path} first"
    st = objects.progressing(conds, gen, "TakingPreRestoreSnapshot", msg)
    st["preRestoreSnapshot"] = pre_name
    raise Retry(st, msg, min(backoff(retry, 0.5, 5), 5.0))


# ----------------------------------------------------------------------------- schedules


@dataclass
class Tick:
    """One reconcile of a SnapshotSchedule: its status, Events, metrics, when to look again."""

    status: dict[str, Any]
    events: list[tuple[str, str, str]]
    sleep: float
    missed: int = 0
    kept: int = 0
    next_run: float | None = None
    last_success: float | None = None
    period: float | None = None


def _owned(obj: dict[str, Any]) -> sched.Owned:
    meta = obj.get("metadata") or {}
    at = (meta.get("annotations") or {}).get(objects.SCHEDULED_AT) or meta.get("creationTimestamp") or ""
    return sched.Owned(meta.get("name", ""), objects.phase_of(obj), objects.parse_time(at),
                       deleting=bool(meta.get("deletionTimestamp")))


def owned_snapshots(body: dict[str, Any], d: Deps) -> list[dict[str, Any]]:
    ns, name, uid, _gen = _meta(body)
    objs = d.list_snapshots(ns, f"{objects.SCHEDULE_LABEL}={label_value(name)}")
    return [o for o in objs
            if any(r.get("uid") == uid for r in (o.get("metadata") or {}).get("ownerReferences") or [])]


def _latest(*stamps: Any) -> datetime:
    return max(objects.parse_time(s) for s in stamps if s)


def schedule_tick(body: dict[str, Any], now: datetime, d: Deps) -> Tick:
    """Start a due run, prune by retention, report. Idempotent: the Snapshot of a run is named
    after its scheduled time, so an operator killed between creating it and recording
    lastScheduleTime finds it again (409) instead of making a second."""
    ns, name, uid, gen = _meta(body)
    status = body.get("status") or {}
    conds = status.get("conditions")
    try:
        spec = sched.parse_schedule(body.get("spec") or {}, ns, d.cfg.default_cluster, d.cfg.default_namespace)
    except SpecError as exc:
        st = objects.schedule_status(conds, gen, phase=objects.FAILED, reason="InvalidSpec", message=str(exc),
                                     fields={"nextScheduleTime": None})
        first = objects.phase_of(body) != objects.FAILED or status.get("observedGeneration") != gen
        return Tick(st, [("Warning", "InvalidSpec", str(exc))] if first else [], d.cfg.schedule_tick)
    owned = [_owned(o) for o in owned_snapshots(body, d)]
    since = _latest(body["metadata"].get("creationTimestamp"), status.get("lastScheduleTime"),
                    status.get("lastMissedTime"))
    plan = sched.plan(spec.cron, spec.retention, spec.concurrency_policy, spec.suspend,
                      spec.starting_deadline_seconds, spec.failed_history_limit, since, owned, now)
    events: list[tuple[str, str, str]] = []
    for victim in plan.prune:
        d.delete_snapshot(ns, victim)
        events.append(("Normal", "Pruned", f"deleted Snapshot {victim}: the retention policy no longer keeps it"))
    fields: dict[str, Any] = {"active": list(plan.active), "kept": len(plan.kept)}
    if plan.last_successful is not None:
        fields["lastSuccessfulSnapshot"] = plan.last_successful.name
        fields["lastSuccessfulTime"] = objects.format_time(plan.last_successful.scheduled_at)
    missed = 0
    message = f"{len(plan.kept)} Snapshot(s) kept"
    due = plan.due
    if due is not None and due.missed and due.latest_missed is not None:
        missed = due.missed
        fields["lastMissedTime"] = objects.format_time(due.latest_missed)
        fields["missedRuns"] = int(status.get("missedRuns") or 0) + missed
        why = ("more than startingDeadlineSeconds late" if due.run_at is None
               else "the operator was not running; only the latest is started")
        events.append(("Warning", "MissedSchedule",
                       f"missed {missed} run(s), the latest scheduled at {fields['lastMissedTime']} ({why})"))
    if due is not None and due.run_at is not None and isinstance(plan.action, sched.Start):
        for victim in plan.action.replace:
            d.delete_snapshot(ns, victim)
            events.append(("Normal", "Replaced", f"deleted unfinished Snapshot {victim} (concurrencyPolicy Replace)"))
        run = derived_name(name, due.run_at.strftime("-%Y%m%d-%H%M%S"))
        obj = d.create_snapshot(ns, objects.scheduled_snapshot(ns, name, uid, spec.snapshot_spec,
                                                               spec.snapshot_labels, run, due.run_at))
        refs = (obj.get("metadata") or {}).get("ownerReferences") or []
        if any(r.get("uid") == uid for r in refs):
            fields["lastScheduleTime"] = objects.format_time(due.run_at)
            fields["active"] = sorted({*plan.active, run})
            events.append(("Normal", "SnapshotScheduled", f"created Snapshot {run} of {spec.snapshot_spec['path']}"))
        else:
            fields["lastMissedTime"] = objects.format_time(due.run_at)
            events.append(("Warning", "NameConflict", f"Snapshot {run} exists and is not this schedule's; run skipped"))
    elif isinstance(plan.action, sched.Defer) and due is not None and due.run_at is not None:
        message += f"; the run due at {objects.format_time(due.run_at)} waits for {', '.join(plan.action.active)}"
    if spec.suspend:
        phase, reason, nxt = "Suspended", "Suspended", None
        message = "suspended; " + message
    else:
        phase, reason = "Active", "Scheduled"
        nxt = due.next_at if due is not None else None
        message = f"next run at {objects.format_time(nxt)}; " + message if nxt else message
    fields["nextScheduleTime"] = objects.format_time(nxt) if nxt else None
    st = objects.schedule_status(conds, gen, phase=phase, reason=reason, message=message, fields=fields)
    st = with_health(st, status, gen, d.health(parse_snapshot(spec.snapshot_spec, ns, d.cfg.default_cluster,
                                                              d.cfg.default_namespace).cluster))
    wake = d.cfg.schedule_tick
    if nxt is not None:
        wake = min(wake, max(0.05, (nxt - now).total_seconds()))
    last_ok = plan.last_successful.scheduled_at if plan.last_successful else objects.parse_time(
        body["metadata"].get("creationTimestamp") or objects.format_time(now))
    period = None if spec.suspend else spec.cron.period(now).total_seconds()
    return Tick(st, events, wake, missed=missed, kept=len(plan.kept),
                next_run=nxt.timestamp() if nxt else None, last_success=last_ok.timestamp(), period=period)


MARKS = ("lastScheduleTime", "lastMissedTime", "missedRuns")


def newest_marks(stored: Any, written: dict[str, Any] | None) -> dict[str, Any]:
    """The stored status, with the run marks of the operator's own last write where those are
    newer (RFC 3339 UTC stamps and counts both order by ``max``)."""
    status = dict(stored) if isinstance(stored, dict) else {}
    for key in MARKS:
        mine = (written or {}).get(key)
        if mine is not None and (status.get(key) is None or mine > status[key]):
            status[key] = mine
    return status


def unchanged(old: Any, new: dict[str, Any]) -> bool:
    """The new status says nothing the stored one does not (skip the write)."""
    if not isinstance(old, dict):
        return False
    return all(old.get(k) == v or (v is None and k not in old) for k, v in new.items())

