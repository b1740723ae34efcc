"""The operator's pure parts: spec parsing, conditions, topology view, reconcile decisions."""

import json
import threading

import pytest

from kubegfs_operator import api, objects, podwatch, reconcile
from kubegfs_operator.cluster import MasterClients, NodeLabels, WatchedViews, build_view
from kubegfs_operator.config import Config


def pod(name, ip, node, ready=True, port=None, component="chunkserver"):
    p = {"metadata": {"name": name, "labels": {"app.kubernetes.io/component": component}},
         "spec": {"nodeName": node, "containers": [{"ports": [{"name": "http", "containerPort": port}]}] if port else []},
         "status": {"phase": "Running", "podIP": ip,
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}
    return p


NODES = {
    "m": {"kubernetes.io/hostname": "m", "topology.kubernetes.io/zone": "za", "topology.kubernetes.io/region": "r1"},
    "a2": {"kubernetes.io/hostname": "a2", "topology.kubernetes.io/zone": "za", "topology.kubernetes.io/region": "r1"},
    "b": {"kubernetes.io/hostname": "b", "topology.kubernetes.io/zone": "zb", "topology.kubernetes.io/region": "r1"},
    "c": {"kubernetes.io/hostname": "c", "topology.kubernetes.io/zone": "zc", "topology.kubernetes.io/region": "r2"},
}
REF = api.ClusterRef("kubegfs", "ns")


def test_parse_snapshot_defaults_and_errors():
    s = api.parse_snapshot({"path": "//data/./x/"}, "team")
    assert s.path == "/data/x" and s.copies == 2 and s.deletion_policy == "Delete"
    assert s.cluster == api.ClusterRef("kubegfs", "team")
    s = api.parse_snapshot({"path": "/d", "cluster": {"name": "prod"}}, "team", default_namespace="storage")
    assert s.cluster == api.ClusterRef("prod", "storage")
    for bad in ({"path": "rel"}, {"path": "/a/../b"}, {}, {"path": "/a", "copies": 0},
                {"path": "/a", "deletionPolicy": "Maybe"}, {"path": "/a", "cluster": {"name": "Bad_Name"}}):
        with pytest.raises(api.SpecError):
            api.parse_snapshot(bad, "team")


def test_parse_restore():
    r = api.parse_restore({"snapshotName": "s"})
    assert r.target_path is None and r.timeout_seconds == 300
    assert api.parse_restore({"snapshotName": "s", "targetPath": "/x//y"}).target_path == "/x/y"
    for bad in ({}, {"snapshotName": "s", "targetPath": "/"}, {"snapshotName": "s", "targetPath": "/a/.."},
                {"snapshotName": "s", "timeoutSeconds": 0}):
        with pytest.raises(api.SpecError):
            api.parse_restore(bad)


def test_ids_derive_from_uid():
    uid = "7612454b-bfa6-4d39-bfd2-3eb43efae626"
    assert api.kubegfs_snapshot_id(uid) == "k8s-" + uid
    assert api.kubegfs_snapshot_name("team", "nightly", uid) == "team.nightly-7612454b"
    from kubegfs.web import record_id
    assert record_id(api.kubegfs_snapshot_id(uid)) and record_id(api.kubegfs_restore_id(uid))


def test_conditions_keep_transition_time_when_status_unchanged():
    a = objects.progressing(None, 1, "Shipping", "x")
    for c in a["conditions"]:
        c["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    b = objects.progressing(a["conditions"], 1, "Shipping", "y")
    assert all(c["lastTransitionTime"] == "2020-01-01T00:00:00Z" for c in b["conditions"])
    c = objects.ready(b["conditions"], 2, "SnapshotReady", "done")
    byt = {x["type"]: x for x in c["conditions"]}
    assert byt["Ready"]["status"] == "True" and byt["Ready"]["lastTransitionTime"] != "2020-01-01T00:00:00Z"
    assert byt["Failed"]["lastTransitionTime"] == "2020-01-01T00:00:00Z"  # False before and after
    assert all(x["observedGeneration"] == 2 for x in c["conditions"])
    assert [x["type"] for x in c["conditions"]] == ["Ready", "Progressing", "Failed"]


def test_settled_means_a_final_outcome_for_this_generation():
    assert not objects.settled(None, 1)
    assert not objects.settled({}, 1)
    assert not objects.settled(objects.progressing(None, 1, "Shipping", "x"), 1)
    assert objects.settled(objects.ready(None, 1, "SnapshotReady", "ok"), 1)
    assert objects.settled(objects.failed(None, 1, "InvalidSpec", "bad"), 1)
    assert not objects.settled(objects.ready(None, 1, "SnapshotReady", "ok"), 2)  # spec changed since
    stale = objects.ready(None, 1, "SnapshotReady", "ok")
    stale["observedGeneration"] = 2  # top level bumped, conditions not: not a final outcome for 2
    assert not objects.settled(stale, 2)


def test_view_ranks_by_node_labels():
    masters = [pod("master-0", "127.0.10.1", "m", port=9400, component="master")]
    css = [pod("cs-far", "127.0.13.1", "c"), pod("cs-zone", "127.0.11.1", "a2"),
           pod("cs-node", "127.0.10.2", "m", port=9600), pod("cs-region", "127.0.12.1", "b"),
           pod("cs-notready", "127.0.10.3", "m", ready=False)]
    v = build_view(REF, masters, css, NODES)
    assert v.master.url == "http://127.0.10.1:9400"
    r = v.rank(2)
    assert [x.candidate.id for x in r] == ["cs-node", "cs-region", "cs-zone", "cs-far"]
    assert [x.reason for x in r] == ["same-node", "same-region", "same-zone", "ip-proximity"]
    assert r[0].candidate.address == "http://127.0.10.2:9600"
    assert build_view(REF, [], css, NODES).rank(2) == []


def no_master(url):
    raise AssertionError("this decision must not call the master")


def deps(snap_obj=None):
    masters = [pod("master-0", "127.0.10.1", "m", component="master")]
    css = [pod("cs-node", "127.0.10.2", "m"), pod("cs-region", "127.0.12.1", "b")]
    view = build_view(REF, masters, css, NODES)
    return reconcile.Deps(Config(token="t"), lambda ref: view, no_master, lambda ns, n: snap_obj)


def test_snapshot_bad_spec_fails_without_calling_the_master():
    body = {"metadata": {"namespace": "ns", "name": "s1", "uid": "u-1", "generation": 3},
            "spec": {"path": "/a/../b"}}
    with pytest.raises(reconcile.Fail) as f:
        reconcile.snapshot(body, 0, 0.0, deps())
    assert f.value.reason == "InvalidSpec"
    conds = {c["type"]: c for c in f.value.status["conditions"]}
    assert conds["Failed"]["status"] == "True" and conds["Failed"]["observedGeneration"] == 3


def test_snapshot_without_master_pod_waits():
    body = {"metadata": {"namespace": "ns", "name": "s1", "uid": "u-1"}, "spec": {"path": "/a"}}
    d = deps()
    d.view = lambda ref: build_view(REF, [], [], NODES)
    with pytest.raises(reconcile.Retry) as r:
        reconcile.snapshot(body, 2, 0.0, d)
    assert r.value.delay == 8.0 and "no ready master pod" in str(r.value)
    assert {c["type"]: c["status"] for c in r.value.status["conditions"]}["Progressing"] == "True"


def test_master_clients_one_per_url_shared_by_threads_and_bounded():
    made: list[str] = []
    gate = threading.Barrier(8)

    def make(url):
        made.append(url)
        return object()

    clients = MasterClients(make, keep=2)
    got: list[object] = []

    def ask():
        gate.wait(5)
        got.append(clients.get("https://m0:9400"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert made == ["https://m0:9400"] and len(got) == 8 and len({id(c) for c in got}) == 1
    first = got[0]
    b = clients.get("https://m1:9400")
    assert clients.get("https://m0:9400") is first  # used last: m1 is now the oldest
    clients.get("https://m2:9400")  # a third URL drops the least recently used one (m1)
    assert clients.get("https://m0:9400") is first
    assert clients.get("https://m1:9400") is not b
    assert made == ["https://m0:9400", "https://m1:9400", "https://m2:9400", "https://m1:9400"]


class _Raw:
    def __init__(self, obj):
        self.data = json.dumps(obj).encode()

    def release_conn(self):
        pass


class _Stream:
    """A streamed watch response: the events' JSON lines, cut into awkward chunks."""

    def __init__(self, events, then=None):
        body = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        self.chunks = [body[i:i + 7] for i in range(0, len(body), 7)]
        self.then = then  # raised after the last chunk (a broken connection)

    def stream(self, amt=None, decode_content=False):
        yield from self.chunks
        if self.then is not None:
            raise self.then

    def release_conn(self):
        pass

    def close(self):
        pass


def ev(kind, name, rv, **fields):
    return {"type": kind, "object": {"metadata": {"name": name, "resourceVersion": str(rv)}, **fields}}


def test_apply_event_keeps_the_pods_and_the_resource_version():
    pods = {}
    assert podwatch.apply_event(pods, ev("ADDED", "a", 5, spec={"nodeName": "m"})) == "5"
    assert podwatch.apply_event(pods, ev("MODIFIED", "a", 6, spec={"nodeName": "b"})) == "6"
    assert pods["a"]["spec"] == {"nodeName": "b"}
    assert podwatch.apply_event(pods, {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}) == "9"
    assert podwatch.apply_event(pods, ev("DELETED", "a", 10)) == "10" and pods == {}
    with pytest.raises(podwatch.Expired):
        podwatch.apply_event(pods, {"type": "ERROR", "object": {"code": 410, "message": "too old"}})
    with pytest.raises(podwatch.WatchError):
        podwatch.apply_event(pods, {"type": "ERROR", "object": {"code": 500, "reason": "InternalError"}})


class WatchCore:
    """list_namespaced_pod as a LIST and as a WATCH; each WATCH answers the next scripted stream."""

    def __init__(self, items, rv, streams):
        self.items, self.rv, self.streams, self.calls = items, rv, list(streams), []
        self.done, self.release = threading.Event(), threading.Event()

    def list_namespaced_pod(self, ns, label_selector, _preload_content, watch=False, resource_version=None, **kw):
        assert _preload_content is False and label_selector == "app.kubernetes.io/name=kubegfs"
        if not watch:
            self.calls.append(("list",))
            return _Raw({"metadata": {"resourceVersion": str(self.rv)}, "items": self.items})
        self.calls.append(("watch", resource_version))
        if not self.streams:
            self.done.set()
            self.release.wait(5)  # a quiet watch
            return _Stream([])
        return self.streams.pop(0)


def test_pod_watch_follows_events_resumes_and_lists_again_after_expiry_or_failure():
    a, b = pod("cs-a", "10.0.0.2", "m"), pod("cs-b", "10.0.0.3", "b")
    a["metadata"]["resourceVersion"] = "3"
    b_del = {"type": "DELETED", "object": {**b, "metadata": {**b["metadata"], "resourceVersion": "12"}}}
    core = WatchCore([a], 3, [
        _Stream([{"type": "ADDED", "object": {**b, "metadata": {**b["metadata"], "resourceVersion": "11"}}}]),
        _Stream([b_del, {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}}]),
        _Stream([{"type": "ERROR", "object": {"code": 410}}]),  # expired: list again at once
        _Stream([], then=ConnectionError("reset")),  # broken: list again after the backoff
    ])
    w = podwatch.PodWatch(core, "ns", "app.kubernetes.io/name=kubegfs", backoff=(0.01, 0.01)).start()
    try:
        assert w.wait_synced(5)
        assert core.done.wait(5)
        assert [p["metadata"]["name"] for p in w.pods()] == ["cs-a"]  # cs-b came and went
        assert core.calls == [("list",), ("watch", "3"), ("watch", "11"), ("watch", "20"), ("list",),
                              ("watch", "3"), ("list",), ("watch", "3")]
        assert w.error is None  # the last LIST succeeded
    finally:
        core.release.set()
        w.stop()


class FakeWatch:
    def __init__(self, pods, synced=True, error=None):
        self._pods, self.synced, self.error, self.stopped = pods, synced, error, False

    def wait_synced(self, timeout):
        return self.synced

    def pods(self):
        return self._pods

    def stop(self):
        self.stopped = True


def test_watched_views_one_watch_per_namespace_and_node_reads_remembered():
    other = pod("cs-other", "10.0.0.9", "c")
    other["metadata"]["labels"]["app.kubernetes.io/instance"] = "another"
    pods = [pod("kubegfs-master-0", "10.0.0.1", "m", component="master"), pod("cs-0", "10.0.0.2", "m"),
            pod("cs-1", "10.0.0.3", "b"), pod("cs-gone-node", "10.0.0.4", "gone"), other]
    for p in pods[:-1]:
        p["metadata"]["labels"]["app.kubernetes.io/instance"] = "kubegfs"
    made, reads = [], []
    watches = {"ns": FakeWatch(pods), "late": FakeWatch([], synced=False, error="Forbidden: pods")}

    def read_node(name):
        reads.append(name)
        if name not in NODES:
            raise RuntimeError("404")
        return NODES[name]

    views = WatchedViews(lambda ns: made.append(ns) or watches[ns], read_node, NodeLabels(ttl=30), 9400, 9500,
                         "https", sync_timeout=0.01)
    v = views.get(REF)
    assert v.master is not None and v.master.name == "kubegfs-master-0" and v.master.zone == "za"
    assert [c.name for c in v.chunkservers] == ["cs-0", "cs-1", "cs-gone-node"]  # not another instance's
    assert v.chunkservers[2].zone == ""  # an unreadable node: no labels, not an error
    views.get(REF)
    assert made == ["ns"] and reads == ["m", "b", "gone", "gone"]  # read labels are remembered
    with pytest.raises(RuntimeError, match="not listed yet: Forbidden"):
        views.get(api.ClusterRef("kubegfs", "late"))
    views.stop()
    assert watches["ns"].stopped and watches["late"].stopped


def test_placement_entry_names_pods():
    e = objects.placement_entry({"id": "cs-a", "address": "http://127.0.10.2:9500"},
                                {"127.0.10.2": {"pod": "cs-0", "node": "m", "zone": "za", "region": "r1"}},
                                {"127.0.10.2": "same-node"})
    assert e == {"pod": "cs-0", "node": "m", "zone": "za", "region": "r1",
                 "address": "http://127.0.10.2:9500", "chunkserver": "cs-a", "reason": "same-node"}


def test_restore_waits_then_gives_up():
    body = {"metadata": {"namespace": "ns", "name": "r1", "uid": "u-2", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"snapshotName": "s1", "timeoutSeconds": 60}}
    with pytest.raises(reconcile.Retry) as r:
        reconcile.restore(body, 0, 0.0, deps(), now=1767225600 + 10)
    assert r.value.status["conditions"][1]["reason"] == "WaitingForSnapshot"
    with pytest.raises(reconcile.Fail) as f:
        reconcile.restore(body, 9, 0.0, deps(), now=1767225600 + 61)
    assert f.value.reason == "SnapshotNotReady" and "60s" in str(f.value)


def test_ready_status_shows_what_changed_since_the_previous_snapshot():
    snap = {"id": "s-1", "name": "n", "created": "2026-12-01T03:30:00.123Z", "files": 3, "dirs": 1, "chunks": 2,
            "logical_bytes": 10, "record_bytes": 300, "shipped_bytes": 2400, "sha256": "ab" * 32,
            "holders": [], "copies": 2,
            "changes": {"since": "n0", "since_id": "s-0", "created": 1, "deleted": 0, "modified": 2, "renamed": 0}}
    st = objects.snapshot_ready_status(None, 1, snap, 0.5, {}, {})
    assert st["shippedBytes"] == 2400
    assert st["changesSincePrevious"] == {"since": "n0", "created": 1, "deleted": 0, "modified": 2, "renamed": 0}
    first = objects.snapshot_ready_status(None, 1, {**snap, "changes": {}}, 0.5, {}, {})
    assert "changesSincePrevious" not in first


def test_publish_writes_the_status_first_and_leaves_it_to_kopf_when_that_fails():
    import kopf
    from kubernetes.client.exceptions import ApiException

    from kubegfs_operator import main as op_main

    class Custom:
        def __init__(self, fail):
            self.fail, self.calls = fail, []

        def patch_namespaced_custom_object_status(self, group, version, ns, plural, name, body, _preload_content=True):
            if self.fail:
                raise ApiException(status=500, reason="etcd timeout")
            self.calls.append((group, version, ns, plural, name, body))
            return _Raw({})

    def runtime(custom):
        return op_main.Runtime(Config(token="t"), None, custom, deps())

    ok = Custom(fail=False)
    patch = kopf.Patch()
    patch.status["phase"] = "Ready"
    patch.metadata.annotations["a"] = "b"
    op_main._publish(runtime(ok), "snapshots", "ns", "s1", patch)
    assert ok.calls == [("kubegfs.io", "v1alpha1", "ns", "snapshots", "s1", {"status": {"phase": "Ready"}})]
    assert "status" not in patch and patch["metadata"] == {"annotations": {"a": "b"}}  # kopf writes the rest

    failing = Custom(fail=True)
    patch = kopf.Patch()
    patch.status["phase"] = "Ready"
    op_main._publish(runtime(failing), "snapshots", "ns", "s1", patch)
    assert patch["status"] == {"phase": "Ready"}  # kopf's patch still carries it

    nothing = Custom(fail=False)
    op_main._publish(runtime(nothing), "snapshots", "ns", "s1", kopf.Patch())
    assert nothing.calls == []


REFUSING = {"cluster": {"cluster_id": "kgfs-new", "refusing": {"chunkserver": "cs-1"}},
            "conditions": [{"type": "ClusterIdentity", "status": "False", "reason": "LostMetadataSuspected",
                            "message": "master refuses every chunkserver: run `kubegfs master recover`"}]}
HEALTHY = {"cluster": {"cluster_id": "kgfs-1", "refusing": None},
           "conditions": [{"type": "ClusterIdentity", "status": "True", "reason": "Confirmed", "message": ""},
                          {"type": "SafeMode", "status": "False", "reason": "Left", "message": ""},
                          {"type": "MetadataReplicated", "status": "True", "reason": "InSync", "message": ""}]}


def test_master_health_names_the_worst_situation_first():
    h = reconcile.master_health(REFUSING)
    assert (h.ok, h.reason, h.refusing, h.warning) == (False, "LostMetadataSuspected", True, True)
    assert "kubegfs master recover" in h.message and "docs/recovery.md" in h.message
    foreign = {"cluster": {"cluster_id": "kgfs-1", "foreign_chunkservers": [{"id": "cs-9"}]},
               "conditions": [{"type": "ClusterIdentity", "status": "True", "reason": "ForeignChunkserversRefused"},
                              {"type": "SafeMode", "status": "True", "reason": "WaitingForReports"}]}
    h = reconcile.master_health(foreign)
    assert (h.ok, h.reason, h.refusing, h.warning) == (False, "ForeignChunkserversRefused", False, True)
    assert "cs-9" in h.message
    safe = {**HEALTHY, "conditions": [{"type": "SafeMode", "status": "True", "message": "3 of 10 chunks reported"}]}
    h = reconcile.master_health(safe)
    assert (h.ok, h.reason, h.warning) == (False, "SafeMode", False) and "3 of 10" in h.message
    short = {**HEALTHY, "conditions": [{"type": "MetadataReplicated", "status": "False", "reason": "Degraded",
                                        "message": "1 of 2 copies in sync"}]}
    assert reconcile.master_health(short).reason == "MetadataCopiesDegraded"
    off = {**HEALTHY, "conditions": [{"type": "MetadataReplicated", "status": "False", "reason": "Off"}]}
    assert reconcile.master_health(off).ok  # a deliberate choice, not a situation
    assert reconcile.master_health(HEALTHY) == reconcile.Health(True, "Healthy", "master serving cluster kgfs-1")


class StatusMaster:
    """A master client that answers ``status`` (and the catalog) from fixed bodies."""

    def __init__(self, status, snapshots=()):
        self._status, self._snapshots = status, list(snapshots)

    def status(self):
        return self._status

    def api(self, method, path, **_):
        assert (method, path) == ("GET", "/snapshots")
        return {"snapshots": self._snapshots}

    def close(self):
        pass


def ready_body():
    st = objects.ready(None, 1, "SnapshotReady", "ok")
    for c in st["conditions"]:
        c["lastTransitionTime"] = "2026-01-01T00:00:10Z"
    st.update(snapshotID="k8s-u1", name="ns.s1-u1")
    return {"metadata": {"namespace": "ns", "name": "s1", "uid": "u1", "generation": 1},
            "spec": {"path": "/data"}, "status": st}


def test_a_refusing_master_marks_nothing_missing_and_says_so_on_the_object():
    body = ready_body()
    d = deps()
    d.master = lambda url: StatusMaster(REFUSING)
    d.catalog = lambda ref: reconcile.fetch_catalog(ref, d)
    d.health = lambda ref: reconcile.fetch_health(ref, d)[0]
    assert d.catalog(REF) is None  # its empty catalog proves nothing
    new_dir = {**HEALTHY, "cluster": {"cluster_id": "kgfs-new", "provisional": True}}
    d.master = lambda url: StatusMaster(new_dir)  # a new, empty directory before any chunkserver reported
    assert d.catalog(REF) is None and reconcile.snapshot_sync(body, d) is None
    d.master = lambda url: StatusMaster(REFUSING)
    res = reconcile.snapshot_sync(body, d)
    conds = {c["type"]: c for c in res.status["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Ready"]["reason"] == "SnapshotReady"
    assert conds["ClusterHealthy"]["status"] == "False"
    assert conds["ClusterHealthy"]["reason"] == "LostMetadataSuspected"
    assert "kubegfs master recover" in conds["ClusterHealthy"]["message"]
    assert res.event is None  # the Event goes on the master pod, once per installation (main)
    body["status"] = {**body["status"], **res.status}
    assert reconcile.snapshot_sync(body, d) is None  # written once
    # recovered: the catalog lists it again, the condition turns True
    d.master = lambda url: StatusMaster(HEALTHY, [{"id": "k8s-u1", "name": "ns.s1-u1", "state": "ready"}])
    res = reconcile.snapshot_sync(body, d)
    conds = {c["type"]: c for c in res.status["conditions"]}
    assert conds["ClusterHealthy"]["status"] == "True" and conds["Ready"]["status"] == "True"
    body["status"] = {**body["status"], **res.status}
    assert reconcile.snapshot_sync(body, d) is None
    # a healthy installation is not written onto objects that never had the condition
    assert reconcile.snapshot_sync(ready_body(), d) is None


def test_snapshot_and_restore_against_a_refusing_master_wait_with_the_way_out():
    from kubegfs.errors import Unavailable

    class Refusing(StatusMaster):
        def api(self, method, path, **_):
            raise Unavailable("master refuses every chunkserver")

    body = {"metadata": {"namespace": "ns", "name": "s1", "uid": "u-1", "generation": 1}, "spec": {"path": "/a"}}
    d = deps()
    d.master = lambda url: Refusing(REFUSING)
    d.health = lambda ref: reconcile.fetch_health(ref, d)[0]
    with pytest.raises(reconcile.Retry) as r:
        reconcile.snapshot(body, 0, 0.0, d)
    conds = {c["type"]: c for c in r.value.status["conditions"]}
    assert conds["Progressing"]["reason"] == "LostMetadataSuspected"
    assert conds["ClusterHealthy"]["status"] == "False" and "recover" in str(r.value)
    d.health = lambda ref: reconcile.master_health(HEALTHY)  # a plain outage stays MasterUnreachable
    with pytest.raises(reconcile.Retry) as r:
        reconcile.snapshot(body, 0, 0.0, d)
    assert {c["type"]: c for c in r.value.status["conditions"]}["Progressing"]["reason"] == "MasterUnreachable"

    snap = ready_body()
    rbody = {"metadata": {"namespace": "ns", "name": "r1", "uid": "u-2", "creationTimestamp": "2026-01-01T00:00:00Z"},
             "spec": {"snapshotName": "s1", "targetPath": "/back"}}
    d = deps(snap)
    d.master = lambda url: Refusing(REFUSING)
    d.health = lambda ref: reconcile.fetch_health(ref, d)[0]
    with pytest.raises(reconcile.Retry) as r:
        reconcile.restore(rbody, 0, 0.0, d)
    assert {c["type"]: c for c in r.value.status["conditions"]}["ClusterHealthy"]["reason"] == "LostMetadataSuspected"
    # once it restores, the condition it carried turns True
    rbody["status"] = r.value.status

    class Restoring(StatusMaster):
        def api(self, method, path, **_):
            return {"path": "/back", "files": 1, "dirs": 1, "mode": "new", "snapshot_id": "k8s-u1", "source": {}}

    d.master = lambda url: Restoring(HEALTHY)
    res = reconcile.restore(rbody, 1, 0.0, d)
    conds = {c["type"]: c for c in res.status["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["ClusterHealthy"]["status"] == "True"


def test_cluster_health_condition_is_written_only_when_it_changes():
    st = objects.ready(None, 1, "SnapshotReady", "ok")
    assert not objects.cluster_health_changed(st, True, "Healthy", "fine")
    assert objects.cluster_health_changed(st, False, "SafeMode", "wait")
    st = objects.with_cluster_health(st, 1, False, "SafeMode", "wait")
    assert [c["type"] for c in st["conditions"]] == ["Ready", "Progressing", "Failed", "ClusterHealthy"]
    assert not objects.cluster_health_changed(st, False, "SafeMode", "wait")
    assert objects.cluster_health_changed(st, True, "Healthy", "fine")
    untouched = objects.healthy_again(objects.ready(None, 1, "SnapshotReady", "ok"), 1)
    assert "ClusterHealthy" not in {c["type"] for c in untouched["conditions"]}


def test_per_installation_cache_does_not_hold_one_installation_behind_another():
    from kubegfs_operator import main as op_main

    slow_started, release = threading.Event(), threading.Event()
    calls: list[str] = []

    def fetch(ref):
        calls.append(ref)
        if ref == "slow":
            slow_started.set()
            release.wait(5)
        return ref.upper()

    cached = op_main._per_installation(fetch, ttl=60)
    t = threading.Thread(target=cached, args=("slow",))
    t.start()
    assert slow_started.wait(5)
    done = threading.Event()
    got: list[str] = []
    threading.Thread(target=lambda: (got.append(cached("fast")), done.set())).start()
    # the other installation is answered while the slow master is still being asked
    assert done.wait(2) and got == ["FAST"]
    release.set()
    t.join(5)
    assert cached("slow") == "SLOW" and cached("fast") == "FAST"
    assert calls == ["slow", "fast"]  # both cached: one fetch each
