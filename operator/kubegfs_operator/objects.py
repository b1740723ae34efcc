"""Pure builders for statuses, conditions (metav1.Condition shape) and event texts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from . import GROUP, VERSION
from .api import label_value

READY, PROGRESSING, FAILED = "Ready", "Progressing", "Failed"
CLUSTER_HEALTHY = "ClusterHealthy"  # the installation as its master reports it (reconcile.master_health)
# status.phase beside the conditions (what `kubectl get` shows)
PENDING, SHIPPING, RESTORING = "Pending", "Shipping", "Restoring"
SCHEDULE_LABEL = f"{GROUP}/schedule"
SCHEDULED_AT = f"{GROUP}/scheduled-at"
PRE_RESTORE_LABEL = f"{GROUP}/pre-restore-for"
RESTORE_UID = f"{GROUP}/restore-uid"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubegfs-operator"}


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_seconds(ts: str) -> str:
    """Kubernetes date-time without sub-second digits (what the API server stores)."""
    return ts.split(".")[0].rstrip("Z") + "Z" if ts else ts


def condition(ctype: str, status: bool | None, reason: str, message: str, generation: int,
              now: str) -> dict[str, Any]:
    return {
        "type": ctype,
        "status": "Unknown" if status is None else ("True" if status else "False"),
        "reason": reason,
        "message": message[:32000],
        "observedGeneration": generation,
        "lastTransitionTime": now,
    }


def merge_conditions(existing: list[dict[str, Any]] | None, updates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace conditions by type; keep ``lastTransitionTime`` when the status did not change."""
    by_type = {c["type"]: dict(c) for c in (existing or []) if isinstance(c, dict) and "type" in c}
    for u in updates:
        old = by_type.get(u["type"])
        if old and old.get("status") == u["status"]:
            u = {**u, "lastTransitionTime": old.get("lastTransitionTime", u["lastTransitionTime"])}
        by_type[u["type"]] = u
    order = {READY: 0, PROGRESSING: 1, FAILED: 2}
    return sorted(by_type.values(), key=lambda c: (order.get(c["type"], 9), c["type"]))


def _state(existing: Any, generation: int, reason: str, message: str, is_ready: bool,
           is_progressing: bool, is_failed: bool, phase: str) -> dict[str, Any]:
    now = now_rfc3339()
    return {
        "observedGeneration": generation,
        "phase": phase,
        "conditions": merge_conditions(existing, [
            condition(READY, is_ready, reason, message, generation, now),
            condition(PROGRESSING, is_progressing, reason, message, generation, now),
            condition(FAILED, is_failed, reason, message, generation, now),
        ]),
    }


def settled(status: Any, generation: int | None) -> bool:
    """The status already records a final outcome (Ready or Failed) for this generation. On a
    restart the operator re-runs its create handlers for objects that are not settled: kopf marks
    an object handled and writes its status in two requests, and a crash between them would
    otherwise leave it handled with no outcome, forever."""
    if not isinstance(status, dict) or status.get("observedGeneration") != generation:
        return False
    return any(isinstance(c, dict) and c.get("type") in (READY, FAILED) and c.get("status") == "True"
               and c.get("observedGeneration") == generation for c in status.get("conditions") or [])


def progressing(existing: Any, generation: int, reason: str, message: str, phase: str = PENDING) -> dict[str, Any]:
    return _state(existing, generation, reason, message, False, True, False, phase)


def failed(existing: Any, generation: int, reason: str, message: str) -> dict[str, Any]:
    return _state(existing, generation, reason, message, False, False, True, FAILED)


def ready(existing: Any, generation: int, reason: str, message: str) -> dict[str, Any]:
    return _state(existing, generation, reason, message, True, False, False, READY)


def phase_of(obj: dict[str, Any]) -> str:
    """The phase of a Snapshot/Restore, also for objects written before status.phase existed."""
    status = obj.get("status") or {}
    if status.get("phase"):
        return str(status["phase"])
    conds = {c.get("type"): c.get("status") for c in status.get("conditions") or [] if isinstance(c, dict)}
    if conds.get(READY) == "True":
        return READY
    return FAILED if conds.get(FAILED) == "True" else PENDING


def reason_of(obj: dict[str, Any]) -> str:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(c, dict) and c.get("type") == READY:
            return str(c.get("reason") or "")
    return ""


def with_cluster_health(status: dict[str, Any], generation: int, ok: bool, reason: str,
                        message: str) -> dict[str, Any]:
    """``status`` with its ``ClusterHealthy`` condition set (the others kept as they are)."""
    cond = condition(CLUSTER_HEALTHY, ok, reason, message, generation, now_rfc3339())
    return {**status, "conditions": merge_conditions(status.get("conditions"), [cond])}


def cluster_health_changed(status: Any, ok: bool, reason: str, message: str) -> bool:
    """The stored ``ClusterHealthy`` condition says something else (or there is none while the
    installation is unhealthy: a healthy one is not written onto objects that never had it)."""
    conds = (status or {}).get("conditions") or [] if isinstance(status, dict) else []
    old = next((c for c in conds if isinstance(c, dict) and c.get("type") == CLUSTER_HEALTHY), None)
    if old is None:
        return not ok
    return (old.get("status"), old.get("reason"), old.get("message")) != ("True" if ok else "False", reason, message)


def healthy_again(status: dict[str, Any], generation: int) -> dict[str, Any]:
    """An operation succeeded: a ``ClusterHealthy`` condition still saying otherwise turns True."""
    for c in status.get("conditions") or []:
        if c.get("type") == CLUSTER_HEALTHY and c.get("status") != "True":
            return with_cluster_health(status, generation, True, "Healthy", "the master served this operation")
    return status


def parse_time(ts: str) -> datetime:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def snapshot_missing(existing: Any, generation: int, name: str, sid: str) -> dict[str, Any]:
    """A Ready Snapshot whose kubegfs snapshot is no longer in the master's catalog."""
    msg = (f"kubegfs snapshot {name} ({sid}) is no longer in the master's catalog (deleted outside "
           "Kubernetes, e.g. `kubegfs snapshot delete --force`); this object has nothing to restore")
    return failed(existing, generation, "SnapshotMissing", msg)


def snapshot_object(namespace: str, name: str, spec: dict[str, Any], labels: dict[str, str],
                    annotations: dict[str, str], owner: dict[str, Any] | None) -> dict[str, Any]:
    """A Snapshot object the operator creates (a schedule's run, a pre-restore Snapshot)."""
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {**labels, **MANAGED_BY},
                            "annotations": annotations}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Snapshot", "metadata": meta, "spec": dict(spec)}


def owner_ref(kind: str, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "name": name, "uid": uid, "controller": True}


def scheduled_snapshot(namespace: str, schedule: str, uid: str, spec: dict[str, Any], labels: dict[str, str],
                       name: str, run_at: datetime) -> dict[str, Any]:
    return snapshot_object(namespace, name, spec, {**labels, SCHEDULE_LABEL: label_value(schedule)},
                           {SCHEDULED_AT: format_time(run_at)}, owner_ref("SnapshotSchedule", schedule, uid))


def pre_restore_snapshot(namespace: str, name: str, restore: str, restore_uid: str, path: str,
                         source_spec: dict[str, Any]) -> dict[str, Any]:
    """Not owned by the Restore: deleting the Restore must not delete the way back."""
    spec = {"path": path, "deletionPolicy": "Delete"}
    for key in ("copies", "cluster"):
        if key in source_spec:
            spec[key] = source_spec[key]
    return snapshot_object(namespace, name, spec, {PRE_RESTORE_LABEL: label_value(restore)},
                           {RESTORE_UID: restore_uid}, None)


def schedule_status(existing: Any, generation: int, *, phase: str, reason: str, message: str,
                    fields: dict[str, Any]) -> dict[str, Any]:
    """Status of a SnapshotSchedule: Ready = it is valid and runs; Failed = its spec can never work."""
    st = _state(existing, generation, reason, message, phase == "Active", False, phase == FAILED, phase)
    st["conditions"] = [c for c in st["conditions"] if c["type"] != PROGRESSING]
    st.update(fields)
    return st


def placement_entry(holder: dict[str, Any], pods_by_ip: dict[str, dict[str, str]],
                    reasons_by_ip: dict[str, str]) -> dict[str, Any]:
    """A status location/copy entry for one record holder, named by its pod."""
    from urllib.parse import urlsplit

    ip = urlsplit(holder.get("address", "")).hostname or ""
    pod = pods_by_ip.get(ip, {})
    return {
        "pod": pod.get("pod", ""),
        "node": pod.get("node", holder.get("node", "")),
        "zone": pod.get("zone", holder.get("zone", "")),
        "region": pod.get("region", holder.get("region", "")),
        "address": holder.get("address", ""),
        "chunkserver": holder.get("id", ""),
        "reason": reasons_by_ip.get(ip, holder.get("reason", "no-affinity")),
    }


def snapshot_ready_status(existing: Any, generation: int, snap: dict[str, Any], duration: float,
                          pods_by_ip: dict[str, dict[str, str]], reasons_by_ip: dict[str, str]) -> dict[str, Any]:
    copies = [placement_entry(h, pods_by_ip, reasons_by_ip) for h in snap.get("holders", [])]
    loc = copies[0] if copies else {}
    where = f"{loc.get('pod') or loc.get('chunkserver')} on node {loc.get('node')} ({loc.get('reason')})"
    msg = (f"{snap['files']} files, {snap['logical_bytes']} bytes; record {snap['record_bytes']} bytes "
           f"on {len(copies)} chunkserver(s), nearest {where}")
    if len(copies) < snap.get("copies", len(copies)):
        msg += f"; only {len(copies)} of {snap['copies']} copies could be placed"
    st = ready(existing, generation, "SnapshotReady", msg)
    st.update({
        "snapshotID": snap["id"],
        "name": snap["name"],
        "creationTime": rfc3339_seconds(snap["created"]),
        "sizeBytes": snap["logical_bytes"],
        "recordBytes": snap["record_bytes"],
        "shippedBytes": snap.get("shipped_bytes", snap["record_bytes"]),
        **({"changesSincePrevious": {k: v for k, v in snap["changes"].items() if k != "since_id"}}
           if snap.get("changes") else {}),
        "files": snap["files"],
        "directories": snap["dirs"],
        "chunks": snap["chunks"],
        "checksum": "sha256:" + snap["sha256"],
        "durationSeconds": round(duration, 3),
        "location": loc,
        "copies": copies,
    })
    return st


def restore_ready_status(existing: Any, generation: int, result: dict[str, Any], duration: float,
                         pods_by_ip: dict[str, dict[str, str]]) -> dict[str, Any]:
    src = placement_entry(result.get("source", {}), pods_by_ip, {})
    src.pop("reason", None)
    msg = (f"restored {result['files']} files to {result['path']} ({result['mode']}) "
           f"from {src.get('pod') or src.get('chunkserver')}")
    st = ready(existing, generation, "Restored", msg)
    st.update({
        "targetPath": result["path"],
        "snapshotID": result.get("snapshot_id", ""),
        "restoredFiles": result["files"],
        "restoredDirectories": result["dirs"],
        "durationSeconds": round(duration, 3),
        "completionTime": now_rfc3339(),
        "source": src,
    })
    return st
