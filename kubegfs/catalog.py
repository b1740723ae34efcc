"""The snapshot catalog as the CLI sees it beside Kubernetes: which custom resource owns a
catalog entry (a ``wire.SnapshotInfo``), and undoable in-place restores (a pre-restore snapshot
first)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .errors import Conflict, NotFound

MAX_NAME = 253


def owner(entry: Mapping[str, Any]) -> str | None:
    """``"Snapshot <namespace>/<name>"`` for an entry the kubegfs operator made, else None."""
    labels = entry.get("labels") or {}
    ns, name = labels.get("kubernetes.namespace"), labels.get("kubernetes.name")
    if not ns or not name:
        return None
    return f"{labels.get('kubernetes.kind', 'Snapshot')} {ns}/{name}"


def refuse_owned_delete(entry: Mapping[str, Any]) -> None:
    """Deleting an entry a Snapshot object owns would leave that object pointing at nothing."""
    who = owner(entry)
    if who is None:
        return
    kind, _sep, ref = who.partition(" ")
    ns, _sep, name = ref.partition("/")
    raise Conflict(f"snapshot {entry['name']} belongs to {who}: delete that object instead "
                   f"(kubectl delete {kind.lower()} -n {ns} {name}), or pass --force to delete it here "
                   f"(the object then turns SnapshotMissing)")


def pre_restore_name(name: str, now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    base, suffix = f"pre-restore-{name}", f"-{stamp}"
    if len(base) + len(suffix) > MAX_NAME:
        digest = hashlib.sha256(base.encode()).hexdigest()[:10]
        base = base[: MAX_NAME - len(suffix) - len(digest) - 1] + "-" + digest
    return base + suffix


def restore_undoable(client: Any, ref: str, to: str | None, pre_restore: bool = True,
                     copies: int = 2) -> dict[str, Any]:
    """Restore ``ref``; in place (``to`` None) first snapshot the target, so the restore can be
    undone by restoring that snapshot. The result names it in ``pre_restore_snapshot`` ("" when
    there was nothing at the path to keep)."""
    pre = ""
    if to is None and pre_restore:
        entry = client.snapshot_show(ref)
        name = pre_restore_name(entry["name"])
        try:
            client.snapshot_create(entry["path"], name, copies, labels={"kubegfs.pre-restore-of": entry["name"]})
            pre = name
        except NotFound:
            pass  # nothing at the path: the restore creates it
    result: dict[str, Any] = client.snapshot_restore(ref, to)
    if to is None:
        result["pre_restore_snapshot"] = pre
    return result
