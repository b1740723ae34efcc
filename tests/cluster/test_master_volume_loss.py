"""Losing the master's volume on real nodes (issue #16 on the cluster of #12): the master's PVC
and pod are deleted, the StatefulSet gives the new pod a new, empty volume, the master refuses
and deletes nothing, and the documented procedure (docs/recovery.md: ``kubegfs master recover``
run in the master pod) brings back every acknowledged file and snapshot from the chunkservers'
metadata copies; the Snapshot object, which stayed Ready and showed ClusterHealthy=False meanwhile,
is healthy again and restores.

Its own release in its own namespace (the operator watches only that one), after the chart
tests' release is gone.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from kubegfs.client import Client
from kubegfs_dev.cluster import Cluster
from kubegfs_dev.realchart import RELEASE, REPO, Release, pod_ready, wait_for

pytestmark = pytest.mark.timeout(1800)

NS = "kgfs-recover"


@pytest.fixture(scope="module")
def env(real_cluster: Cluster, image_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    rel = Release(real_cluster, NS, tmp_path_factory.mktemp("recover"), image_tag)
    real_cluster.recycle_volumes()
    rel.create_namespace()
    yield rel
    rel.remove()


def _chunk_files(env: Release) -> set[str]:
    """Every chunk file on every chunkserver pod's volume (pod/name)."""
    return {f"{p['metadata']['name']}/{f.name}" for p in env.pods("chunkserver")
            for f in (env.pv_path(p) / "chunks").glob("*/*.chk")}


def _reason(env: Release, kind: str, name: str) -> str:
    conds = env.get(kind, name).get("status", {}).get("conditions", [])
    return next((c.get("reason", "") for c in conds if c["type"] == "Ready"), "")


def _health(env: Release, kind: str, name: str) -> dict[str, Any]:
    conds = env.get(kind, name).get("status", {}).get("conditions", [])
    return next((c for c in conds if c["type"] == "ClusterHealthy"), {})


def _identity(cl: Client) -> dict[str, Any]:
    return next(c for c in cl.status()["conditions"] if c["type"] == "ClusterIdentity")


def test_master_pvc_and_pod_deleted_then_the_documented_recover_brings_everything_back(env: Release) -> None:
    env.install()
    wait_for("every kubegfs pod Running and Ready", env.all_ready, timeout=300)
    cl = env.client()
    wait_for("2 metadata copies in sync", lambda: cl.status()["metadata_replication"]["in_sync"] >= 2, 120)
    assert cl.status()["metadata_replication"]["mode"] == "sync"  # the chart's default
    cl.mkdir("/data", parents=True)
    snap_bytes = {f"f{i}": secrets.token_bytes(300_000 + 7919 * i) for i in range(4)}
    for n, data in snap_bytes.items():
        cl.put(f"/data/{n}", data)
    env.kubectl("apply", "-n", NS, "-f", str(REPO / "examples" / "snapshot.yaml"))
    snap = wait_for("Snapshot data-nightly Ready", lambda: env.condition("snapshot", "data-nightly"), 180)
    sid = snap["status"]["snapshotID"]
    # acknowledged after the snapshot: in sync mode these are on the copies too
    cl.put("/data/f0", b"overwritten after the snapshot")
    cl.put("/after", secrets.token_bytes(50_000))
    after = cl.get("/after")
    want = cl.dump()

    old = env.pods("master")[0]
    old_pv = env.pv_path(old)
    claim = next(v["persistentVolumeClaim"]["claimName"] for v in old["spec"]["volumes"] if v["name"] == "data")
    old_claim = env.get("pvc", claim)["metadata"]["uid"]
    chunks = _chunk_files(env)
    assert chunks
    # the procedure: delete the master's PVC and pod; the StatefulSet makes a new, empty claim
    env.kubectl("delete", "pvc", "-n", NS, claim, "--wait=false")
    env.kubectl("delete", "pod", "-n", NS, old["metadata"]["name"], "--grace-period=0", "--force")
    new = wait_for("a new master pod on a new volume", lambda: [
        p for p in env.pods("master") if p["metadata"]["uid"] != old["metadata"]["uid"] and pod_ready(p)], 300)[0]
    assert env.pv_path(new) != old_pv
    pvc = env.get("pvc", claim)
    assert pvc["metadata"]["uid"] != old_claim and pvc["status"]["phase"] == "Bound", pvc["status"]
    cl = env.client()
    wait_for("the new master to refuse (LostMetadataSuspected)", lambda: cl.status()["cluster"]["refusing"], 180)
    assert _identity(cl)["reason"] == "LostMetadataSuspected", _identity(cl)
    assert chunks <= _chunk_files(env), "a refusing master must not have anything deleted"
    # the operator says so where a user looks: the Snapshot stays Ready (its record is safe on the
    # chunkservers; the refusing master's empty catalog proves nothing) with ClusterHealthy=False,
    # and the master pod gets a Warning Event
    wait_for("the Snapshot's ClusterHealthy=False (LostMetadataSuspected)",
             lambda: _health(env, "snapshot", "data-nightly").get("reason") == "LostMetadataSuspected", 200)
    assert _reason(env, "snapshot", "data-nightly") == "SnapshotReady"
    assert "kubegfs master recover" in _health(env, "snapshot", "data-nightly")["message"]
    pod_events = env.kubectl("get", "events", "-n", NS, "--field-selector",
                             f"involvedObject.name={new['metadata']['name']}", "-o", "jsonpath={.items[*].reason}")
    assert "LostMetadataSuspected" in pod_events, pod_events

    out = env.kubectl("exec", "-n", NS, f"statefulset/{RELEASE}-master", "--", "kubegfs", "master", "recover",
                      "--master", "https://127.0.0.1:9400", "--token-file", "/etc/kubegfs/token")  # the pod's env names the CA
    assert "from metadata" in out and "warning" not in out, out
    cl = env.client()
    assert cl.dump() == want
    assert _identity(cl)["status"] == "True", _identity(cl)
    # the chunkservers register with the recovered master at their next heartbeats (GFS)
    wait_for("every chunkserver registered again", lambda: len([
        s for s in cl.chunkservers() if s.get("alive")]) == 3, 120)
    assert cl.get("/data/f0") == b"overwritten after the snapshot" and cl.get("/after") == after
    for n in ("f1", "f2", "f3"):
        assert cl.get(f"/data/{n}") == snap_bytes[n]
    assert sid in {s["id"] for s in cl.snapshot_list()}

    back = wait_for("the Snapshot Ready again", lambda: env.condition("snapshot", "data-nightly"), 200)
    wait_for("the Snapshot's ClusterHealthy=True",
             lambda: _health(env, "snapshot", "data-nightly").get("status") == "True", 200)
    assert back["status"]["snapshotID"] == sid
    env.kubectl("apply", "-n", NS, "-f", str(REPO / "examples" / "restore.yaml"))
    wait_for("Restore Ready", lambda: env.condition("restore", "data-nightly-restore"), 180)
    for n, data in snap_bytes.items():
        assert hashlib.sha256(cl.get(f"/data-restored/{n}")).hexdigest() == hashlib.sha256(data).hexdigest()
    # the recovered master keeps its copies
    wait_for("2 metadata copies in sync again", lambda: cl.status()["metadata_replication"]["in_sync"] >= 2, 120)
    print(f"\n# master volume lost and recovered; old PV {old_pv} left Released ({json.dumps(out.strip())})")
