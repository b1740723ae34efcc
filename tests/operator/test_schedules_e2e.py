"""SnapshotSchedule, undoable restores and one catalog, end to end: real kube-apiserver (with the
garbage collector of kube-controller-manager), real master/chunkserver processes, the operator
as its own ServiceAccount with only operator/rbac.yaml. Schedules use a seconds field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kubegfs_dev.util import wait_for

KUBEGFS = str(Path(sys.executable).parent / "kubegfs")


@pytest.fixture(autouse=True)
def fast_operator(monkeypatch):
    """Look at schedules every second and check the catalog every second (the stack's operator
    inherits this environment)."""
    monkeypatch.setenv("KUBEGFS_SCHEDULE_TICK_SECONDS", "1")
    monkeypatch.setenv("KUBEGFS_CATALOG_SYNC_SECONDS", "1")


def apply(stack, obj):
    stack.kubectl("apply", "-f", "-", input=json.dumps(obj))


def schedule(name, path="/data", every=2, **spec):
    return {"apiVersion": "kubegfs.io/v1alpha1", "kind": "SnapshotSchedule", "metadata": {"name": name},
            "spec": {"path": path, "schedule": f"*/{every} * * * * *",
                     "snapshotTemplate": {"copies": 1}, **spec}}


def owned(stack, name):
    uid = stack.get("snapshotschedules", name)["metadata"]["uid"]
    items = stack.custom.list_namespaced_custom_object("kubegfs.io", "v1alpha1", stack.ns, "snapshots")["items"]
    return [o for o in items if any(r["uid"] == uid for r in o["metadata"].get("ownerReferences") or [])]


def phases(objs):
    return sorted((o.get("status") or {}).get("phase", "") for o in objs)


def scheduled_at(obj):
    return datetime.strptime(obj["metadata"]["annotations"]["kubegfs.io/scheduled-at"],
                             "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def catalog_by_object(stack):
    return {s["labels"].get("kubernetes.name"): s for s in stack.cluster.client().snapshot_list()}


def cli(stack, *args, check=False):
    env = {**os.environ, "COLUMNS": "1000", "KUBEGFS_MASTER": stack.cluster.master_url, "KUBEGFS_TOKEN": stack.cluster.token}
    return subprocess.run([KUBEGFS, *args], env=env, capture_output=True, text=True, timeout=120, check=check)


def ready(stack, plural, name, timeout=60):
    wait_for(lambda: stack.condition(plural, name) == "True" or stack.condition(plural, name, "Failed") == "True",
             timeout=timeout, what=f"{plural}/{name} to finish")
    obj = stack.get(plural, name)
    assert stack.condition(plural, name) == "True", obj.get("status")
    return obj


def test_schedule_fires_on_time_keeps_the_retention_suspends_and_cascades(stack):
    c = stack.cluster.client()
    c.mkdir("/data")
    c.put("/data/f", b"scheduled" * 100)
    apply(stack, schedule("every2s", retention={"keepLast": 3}))
    # runs start on even seconds, get Ready, and retention keeps exactly the newest three
    wait_for(lambda: len([o for o in owned(stack, "every2s") if (o.get("status") or {}).get("phase") == "Ready"]) >= 3
             and (stack.get("snapshotschedules", "every2s").get("status") or {}).get("kept") == 3,
             timeout=60, what="three kept Ready snapshots")
    wait_for(lambda: any(e.startswith("Pruned") for e in events(stack, "every2s")), timeout=30, what="a prune")
    sched = stack.get("snapshotschedules", "every2s")
    st = sched["status"]
    assert st["phase"] == "Active" and st["lastSuccessfulSnapshot"].startswith("every2s-")
    assert datetime.strptime(st["nextScheduleTime"], "%Y-%m-%dT%H:%M:%SZ").second % 2 == 0
    objs = owned(stack, "every2s")
    for o in objs:
        assert scheduled_at(o).second % 2 == 0
        assert o["metadata"]["name"] == "every2s-" + scheduled_at(o).strftime("%Y%m%d-%H%M%S")
        assert o["metadata"]["labels"]["kubegfs.io/schedule"] == "every2s"
        ref = o["metadata"]["ownerReferences"][0]
        assert ref["kind"] == "SnapshotSchedule" and ref["uid"] == sched["metadata"]["uid"]
    # a run can turn Ready between two looks of the operator: at its next look only 3 remain
    wait_for(lambda: len([o for o in owned(stack, "every2s") if (o.get("status") or {}).get("phase") == "Ready"
                          and not o["metadata"].get("deletionTimestamp")]) == 3, timeout=30, what="exactly 3 kept")
    # pruned Snapshots went through the finalizer: their kubegfs snapshots are gone too
    wait_for(lambda: set(catalog_by_object(stack)) <= {o["metadata"]["name"] for o in owned(stack, "every2s")},
             timeout=30, what="the catalog to hold only the kept snapshots")
    out = stack.kubectl("get", "gsched").stdout
    assert "every2s" in out and "Active" in out and "*/2 * * * * *" in out
    assert "Ready" in stack.kubectl("get", "gsnap").stdout

    # suspend: no new runs; resume: runs again
    stack.kubectl("patch", "gsched", "every2s", "--type", "merge", "-p", '{"spec":{"suspend":true}}')
    wait_for(lambda: stack.get("snapshotschedules", "every2s")["status"]["phase"] == "Suspended",
             timeout=30, what="Suspended")
    last = stack.get("snapshotschedules", "every2s")["status"]["lastScheduleTime"]
    time.sleep(5)
    st = stack.get("snapshotschedules", "every2s")["status"]
    assert st["lastScheduleTime"] == last and st.get("nextScheduleTime") is None
    stack.kubectl("patch", "gsched", "every2s", "--type", "merge",
                  "-p", '{"spec":{"suspend":false,"startingDeadlineSeconds":1}}')
    wait_for(lambda: stack.get("snapshotschedules", "every2s")["status"]["lastScheduleTime"] > last,
             timeout=30, what="a run after resuming")
    st = stack.get("snapshotschedules", "every2s")["status"]
    assert st["phase"] == "Active" and st.get("missedRuns", 0) >= 1  # the suspended runs, past the deadline

    m = stack.operator_metrics()
    ns = stack.ns
    assert f'kubegfs_snapshots_retained{{namespace="{ns}",schedule="every2s"}}' in m
    assert f'kubegfs_schedule_next_run_timestamp_seconds{{namespace="{ns}",schedule="every2s"}} 1.' in m
    assert f'kubegfs_schedule_runs_total{{namespace="{ns}",result="success",schedule="every2s"}}' in m
    assert f'kubegfs_schedule_missed_total{{namespace="{ns}",schedule="every2s"}}' in m

    # deleting the schedule deletes its Snapshots (garbage collector), and their data (Delete policy)
    stack.kubectl("delete", "gsched", "every2s", "--wait=true", "--timeout=60s")
    wait_for(lambda: not [o for o in stack.custom.list_namespaced_custom_object(
        "kubegfs.io", "v1alpha1", stack.ns, "snapshots")["items"]], timeout=60, what="the Snapshots to go")
    assert not [n for n in catalog_by_object(stack) if n and n.startswith("every2s-")]
    assert "schedule=\"every2s\"" not in stack.operator_metrics().split("kubegfs_schedule_runs_total")[0]


def events(stack, name):
    out = stack.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}",
                        "-o", "jsonpath={range .items[*]}{.reason}: {.message}{'\\n'}{end}").stdout
    return [line for line in out.splitlines() if line]


def test_operator_killed_across_runs_no_duplicate_and_retain_survives_the_schedule(stack):
    c = stack.cluster.client()
    c.mkdir("/data")
    c.put("/data/f", b"x")
    apply(stack, schedule("kill3s", every=3, concurrencyPolicy="Allow", retention={"keepLast": 100},
                          snapshotTemplate={"copies": 1, "deletionPolicy": "Retain"}))
    wait_for(lambda: len(owned(stack, "kill3s")) >= 2, timeout=30, what="two runs")
    stack.kill_operator()
    down_at = datetime.now(UTC)
    time.sleep(8)  # at least two scheduled times pass while it is down
    up_at = datetime.now(UTC)
    stack.start_operator()
    def created(o):
        return datetime.strptime(o["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)

    wait_for(lambda: any(created(o) >= up_at.replace(microsecond=0) for o in owned(stack, "kill3s")),
             timeout=30, what="a run after the restart")
    objs = owned(stack, "kill3s")
    catch_up = min((o for o in objs if created(o) >= up_at.replace(microsecond=0)), key=scheduled_at)
    # it caught up once (the latest missed time), not once per missed time
    assert (scheduled_at(catch_up) - down_at).total_seconds() > 3  # so at least one time was missed
    assert not [o["metadata"]["name"] for o in objs if down_at < scheduled_at(o) < scheduled_at(catch_up)]
    # the run's Snapshot is created before the schedule's status is written
    st = wait_for(lambda: (s := stack.get("snapshotschedules", "kill3s")["status"]).get("missedRuns") and s,
                  timeout=30, what="the missed run in the schedule's status")
    assert st["missedRuns"] >= 1 and st["lastMissedTime"]
    assert any(e.startswith("MissedSchedule") for e in events(stack, "kill3s"))
    wait_for(lambda: all((o.get("status") or {}).get("phase") == "Ready" for o in owned(stack, "kill3s")),
             timeout=60, what="all runs Ready")
    objs = owned(stack, "kill3s")
    times = [scheduled_at(o) for o in objs]
    assert len(times) == len(set(times))
    uids = {o["metadata"]["uid"] for o in objs}
    ours = [s for s in c.snapshot_list() if s["labels"].get("kubernetes.uid") in uids]
    assert len(ours) == len(objs)  # exactly one kubegfs snapshot per Snapshot object
    # the schedule goes, its Snapshots go (garbage collector), their data stays (Retain)
    stack.kubectl("delete", "gsched", "kill3s", "--wait=true", "--timeout=60s")
    wait_for(lambda: not stack.custom.list_namespaced_custom_object(
        "kubegfs.io", "v1alpha1", stack.ns, "snapshots")["items"], timeout=60, what="the Snapshots to go")
    kept = {s["labels"].get("kubernetes.uid") for s in c.snapshot_list()}
    assert uids <= kept


def tree(c, root):
    out = {}
    for e in c.ls(root):
        p = e["path"]
        out[p] = tree(c, p) if e["type"] == "dir" else c.get(p)
    return out


def restore(name, snap, **spec):
    return {"apiVersion": "kubegfs.io/v1alpha1", "kind": "Restore", "metadata": {"name": name},
            "spec": {"snapshotName": snap, **spec}}


def snapshot(name, path="/data"):
    return {"apiVersion": "kubegfs.io/v1alpha1", "kind": "Snapshot", "metadata": {"name": name},
            "spec": {"path": path, "copies": 1}}


def test_undo_an_in_place_restore_and_one_catalog_with_the_cli(stack):
    c = stack.cluster.client()
    c.mkdir("/data/sub", parents=True)
    c.put("/data/a", b"version one")
    c.put("/data/sub/b", bytes(range(256)) * 100)
    apply(stack, snapshot("s1"))
    s1 = ready(stack, "snapshots", "s1")
    before = tree(c, "/data")
    # later changes a mistaken restore would destroy
    c.put("/data/a", b"version two, precious")
    c.rm("/data/sub/b")
    c.put("/data/new", b"made after s1")
    precious = tree(c, "/data")

    apply(stack, restore("oops", "s1"))
    r = ready(stack, "restores", "oops")["status"]
    assert r["phase"] == "Ready" and r["preRestoreSnapshot"] == "oops-pre-restore"
    assert "undo with a Restore of Snapshot oops-pre-restore" in r["conditions"][0]["message"]
    assert tree(c, "/data") == before
    pre = stack.get("snapshots", "oops-pre-restore")
    assert pre["metadata"]["labels"]["kubegfs.io/pre-restore-for"] == "oops" and pre["status"]["phase"] == "Ready"
    # one more Restore undoes it, byte for byte
    apply(stack, restore("undo", "oops-pre-restore"))
    ready(stack, "restores", "undo")
    assert tree(c, "/data") == precious
    # opting out takes no pre-restore Snapshot
    apply(stack, restore("plain", "s1", preRestoreSnapshot=False))
    assert "preRestoreSnapshot" not in ready(stack, "restores", "plain")["status"]
    out = stack.kubectl("get", "gsnap,grestore").stdout
    assert "PHASE" in out and "oops-pre-restore" in out

    # one catalog: the CLI shows the owner and refuses to delete an owned snapshot
    catalog_name = s1["status"]["name"]
    listing = cli(stack, "snapshot", "list")
    assert f"Snapshot {stack.ns}/s1" in listing.stdout, listing
    refused = cli(stack, "snapshot", "delete", catalog_name)
    assert refused.returncode != 0 and f"Snapshot {stack.ns}/s1" in refused.stderr
    assert refused.stderr.startswith("kubegfs: error:") and "--force" in refused.stderr
    assert catalog_name in {s["name"] for s in c.snapshot_list()}
    forced = cli(stack, "snapshot", "delete", "--force", catalog_name)
    assert forced.returncode == 0, forced.stderr
    wait_for(lambda: stack.condition("snapshots", "s1", "Failed") == "True", timeout=30, what="SnapshotMissing")
    st = stack.get("snapshots", "s1")["status"]
    assert st["phase"] == "Failed" and {x["type"]: x for x in st["conditions"]}["Ready"]["reason"] == "SnapshotMissing"
    assert any(e.startswith("SnapshotMissing") for e in events(stack, "s1"))
    assert "SnapshotMissing" in stack.kubectl("get", "gsnap", "s1").stdout
    # the CLI's own in-place restore is undoable too
    c.put("/data/a", b"cli state")
    cli_state = tree(c, "/data")
    done = cli(stack, "snapshot", "restore", "--json", pre["status"]["name"])
    assert done.returncode == 0, done.stderr
    undo_name = json.loads(done.stdout)["pre_restore_snapshot"]
    assert undo_name.startswith("pre-restore-") and tree(c, "/data") == precious
    plain = cli(stack, "snapshot", "restore", undo_name)
    assert plain.returncode == 0 and "undo with: kubegfs snapshot restore pre-restore-" in plain.stdout
    assert tree(c, "/data") == cli_state
    # nothing at the target: nothing to keep, no pre-restore Snapshot is left behind
    c.rm("/data", recursive=True)
    apply(stack, restore("again", "oops-pre-restore"))
    r = ready(stack, "restores", "again")["status"]
    assert "preRestoreSnapshot" not in r and tree(c, "/data") == precious
    wait_for(lambda: stack.condition("snapshots", "again-pre-restore") == "Missing", timeout=30,
             what="the failed pre-restore Snapshot to be deleted")


def test_longest_names_in_the_longest_namespace_reach_ready(long_stack):
    stack = long_stack
    c = stack.cluster.client()
    c.mkdir("/data")
    c.put("/data/f", b"long")
    # 253 characters, dots and dashes (the 'unicode-adjacent' punctuation a DNS subdomain allows)
    long_name = ("a-b.c" * 60 + "x" * 53)[:253]
    assert len(long_name) == 253
    apply(stack, snapshot(long_name))
    st = ready(stack, "snapshots", long_name)["status"]
    assert len(st["name"]) <= 253 and st["phase"] == "Ready"
    apply(stack, restore(long_name, long_name))
    r = ready(stack, "restores", long_name)["status"]
    pre = r["preRestoreSnapshot"]
    assert len(pre) <= 253 and pre.endswith("-pre-restore")
    assert stack.get("snapshots", pre)["status"]["phase"] == "Ready"
    sched = schedule(long_name, every=2, retention={"keepLast": 1})
    apply(stack, sched)
    wait_for(lambda: any((o.get("status") or {}).get("phase") == "Ready" for o in owned(stack, long_name)),
             timeout=60, what="a Ready run of the long-named schedule")
    run = owned(stack, long_name)[0]["metadata"]
    assert len(run["name"]) <= 253 and len(run["labels"]["kubegfs.io/schedule"]) <= 63


def test_examples_are_valid_and_cel_rejects_bad_schedules(stack):
    examples = Path(__file__).resolve().parents[2] / "examples"
    for f in sorted(examples.glob("*.yaml")):
        r = stack.kubectl("apply", "--dry-run=server", "-f", str(f), check=False)
        assert r.returncode == 0, f"{f.name}: {r.stderr}"
    for spec, words in [({"schedule": "TZ=UTC 0 2 * * *"}, "spec.timeZone"),
                        ({"schedule": "0 2 * *"}, "5 fields"),
                        ({"path": "rel"}, "absolute"),
                        ({"concurrencyPolicy": "Sometimes"}, "concurrencyPolicy"),
                        ({"retention": {"keepDaily": -1}}, "keepDaily"),
                        ({"timeZone": "Europe/Berlin; rm"}, "timeZone")]:
        obj = schedule("bad")
        obj["spec"].update(spec)
        r = stack.kubectl("apply", "-f", "-", input=json.dumps(obj), check=False)
        assert r.returncode != 0 and words in r.stderr, (spec, r.stderr)
    # what CEL cannot see, the operator reports as the user's spec error, once, and starts nothing
    obj = schedule("never")
    obj["spec"]["schedule"] = "0 0 30 2 *"
    apply(stack, obj)
    wait_for(lambda: (stack.get("snapshotschedules", "never").get("status") or {}).get("phase") == "Failed",
             timeout=30, what="Failed")
    st = stack.get("snapshotschedules", "never")["status"]
    assert {c["type"]: c for c in st["conditions"]}["Failed"]["reason"] == "InvalidSpec"
    assert "never fires" in st["conditions"][0]["message"] and not owned(stack, "never")
    assert [e for e in events(stack, "never") if e.startswith("InvalidSpec")]


def health(stack, plural, name):
    conds = (stack.get(plural, name).get("status") or {}).get("conditions") or []
    return next((c for c in conds if c["type"] == "ClusterHealthy"), {})


def test_a_lost_master_volume_shows_on_every_object_and_the_master_pod_until_recover(stack):
    """The master's data directory is lost: the Snapshot stays Ready (its record is safe on the
    chunkservers) and, like the schedule and a Restore that waits, says ClusterHealthy=False
    LostMetadataSuspected with the way out; the master pod gets a Warning Event. After
    `kubegfs master recover` all of it turns healthy and the Restore completes."""
    import shutil
    import signal

    c = stack.cluster.client()
    c.mkdir("/data", parents=True)
    c.put("/data/a", b"kept across the loss")
    apply(stack, snapshot("s1"))
    ready(stack, "snapshots", "s1")
    apply(stack, schedule("paused", suspend=True))
    wait_for(lambda: (stack.get("snapshotschedules", "paused").get("status") or {}).get("phase") == "Suspended",
             timeout=30, what="the schedule reconciled")
    assert health(stack, "snapshots", "s1") == {}  # a healthy installation adds nothing

    cl = stack.cluster
    cl.kill(cl.master, signal.SIGKILL)
    shutil.rmtree(cl.master.data)
    cl.start_master()
    wait_for(lambda: c.status()["cluster"]["refusing"], timeout=30, what="the empty master to refuse")
    for plural, name in (("snapshots", "s1"), ("snapshotschedules", "paused")):
        wait_for(lambda p=plural, n=name: health(stack, p, n).get("reason") == "LostMetadataSuspected", timeout=30,
                 what=f"{plural}/{name} ClusterHealthy=False")
        assert health(stack, plural, name)["status"] == "False"
        assert "kubegfs master recover" in health(stack, plural, name)["message"]
    assert stack.condition("snapshots", "s1") == "True"  # not SnapshotMissing: the empty catalog proves nothing
    listed = stack.kubectl("get", "gsnap", "s1").stdout
    assert "CLUSTER" in listed and "LostMetadataSuspected" in listed, listed
    master_events = events(stack, stack.master_pod.name)
    assert any(e.startswith("LostMetadataSuspected: ") and "recover" in e for e in master_events), master_events
    warned = stack.kubectl("get", "events", "--field-selector", f"involvedObject.name={stack.master_pod.name}",
                           "-o", "jsonpath={.items[*].type}").stdout
    assert "Warning" in warned
    apply(stack, restore("back", "s1", targetPath="/back"))
    wait_for(lambda: health(stack, "restores", "back").get("reason") == "LostMetadataSuspected", timeout=30,
             what="the Restore waiting with the reason")
    assert stack.condition("restores", "back", "Progressing") == "True"

    out = cli(stack, "master", "recover")
    assert out.returncode == 0, out.stderr
    obj = ready(stack, "restores", "back", timeout=90)
    assert health(stack, "restores", "back")["status"] == "True", obj["status"]
    assert c.get("/back/a") == b"kept across the loss"
    for plural, name in (("snapshots", "s1"), ("snapshotschedules", "paused")):
        wait_for(lambda p=plural, n=name: health(stack, p, n).get("status") == "True", timeout=60,
                 what=f"{plural}/{name} ClusterHealthy=True")
    assert stack.condition("snapshots", "s1") == "True"
    wait_for(lambda: any(e.startswith("ClusterHealthy: ") for e in events(stack, stack.master_pod.name)),
             timeout=30, what="the master pod's all-clear Event")
