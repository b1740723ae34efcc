"""The Helm chart on real nodes: kubelet + containerd pods from our images, in a PSS-restricted
namespace, with the operator in its own pod.

Placement (values below): the master is pinned to kgfs-n1 (zone-a, region-1); the chunkservers may
not run there, so they land on kgfs-n2 (zone-b, region-1) and kgfs-n3 (zone-c, region-2). The
chunkserver nearest to the master is therefore the one(s) on kgfs-n2 — same region, other zone —
which is neither "same node" nor the first pod by name.

The tests share one release and run in file order: install → helm test → snapshot/restore →
master killed → chunkserver deleted → operator deleted mid-snapshot → upgrade → uninstall.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from kubegfs.client import Client
from kubegfs_dev.cluster import Cluster
from kubegfs_dev.realchart import (
    CHART,
    CHUNKSERVERS,
    MASTER_NODE,
    RELEASE,
    REPO,
    Release,
    pod_ready,
    wait_for,
)
from kubegfs_dev.util import free_port, stored_records

pytestmark = pytest.mark.timeout(900)

NS = "kgfs-real"


@pytest.fixture(scope="module")
def env(real_cluster: Cluster, image_tag: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    rel = Release(real_cluster, NS, tmp_path_factory.mktemp("real"), image_tag)
    real_cluster.recycle_volumes()  # claims of an earlier run on a reused cluster
    rel.create_namespace()
    yield rel
    rel.remove()


# the session's cluster comes up in this test's setup: a cold image build (debootstrap, wheels)
# plus the cluster and the image import can take a good part of this on 2 cores
@pytest.mark.timeout(2700)
def test_install_every_pod_ready_in_restricted_namespace(env: Release) -> None:
    t0 = time.monotonic()
    env.install()
    pods = wait_for("every kubegfs pod Running and Ready", env.all_ready, timeout=300)
    print(f"\n# helm install -> all Ready in {time.monotonic() - t0:.1f}s")
    ns = json.loads(env.kubectl("get", "namespace", NS, "-o", "json"))
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    nodes = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods}
    master = env.pods("master")[0]
    assert master["spec"]["nodeName"] == MASTER_NODE
    assert all(env.pods("chunkserver")) and {p["spec"]["nodeName"] for p in env.pods("chunkserver")} <= {
        "kgfs-n2", "kgfs-n3"}, nodes
    for p in pods:  # really our images, really the restricted securityContext, on a real pod IP
        for cs in p["status"]["containerStatuses"]:
            assert cs["image"].startswith("localhost/kubegfs/"), cs
        assert p["status"]["podIP"].startswith("198.18."), p["status"]
        assert p["spec"]["securityContext"]["runAsNonRoot"] is True
    # the master reads its zone from its Node and sees every chunkserver
    cl = env.client()
    alive = wait_for("3 live chunkservers", lambda: _live(cl) if len(_live(cl)) == 3 else None)
    assert {s["location"]["zone"] for s in alive} == {"zone-b", "zone-c"}, alive


def test_helm_test_pod_runs_and_passes(env: Release) -> None:
    # (no --logs: the hook's delete policy removes the pod as soon as it succeeded)
    out = env.helm("test", RELEASE, "-n", NS, "--timeout", "5m")
    assert "TEST SUITE:     kubegfs-test-snapshot" in out and "Phase:          Succeeded" in out, out


def _live(cl: Client) -> list[dict[str, Any]]:
    return [s for s in cl.chunkservers() if s.get("alive")]


def _write_tree(cl: Client, root: str, n: int = 5) -> dict[str, str]:
    cl.mkdir(root, parents=True)
    digests = {}
    for i in range(n):
        data = secrets.token_bytes(300_000 + 7919 * i)  # more than one 256 KiB chunk each
        cl.put(f"{root}/f{i}", data)
        digests[f"f{i}"] = hashlib.sha256(data).hexdigest()
    return digests


def _read_tree(cl: Client, root: str, names: list[str]) -> dict[str, str]:
    return {n: hashlib.sha256(cl.get(f"{root}/{n}")).hexdigest() for n in names}


def _expected_nearest(env: Release) -> set[str]:
    """Chunkserver pods nearest to the master pod by their Nodes' labels (node > zone > region)."""
    labels = {n["metadata"]["name"]: n["metadata"]["labels"]
              for n in json.loads(env.kubectl("get", "nodes", "-o", "json"))["items"]}
    m = labels[env.pods("master")[0]["spec"]["nodeName"]]

    def score(pod: dict[str, Any]) -> int:
        lab = labels[pod["spec"]["nodeName"]]
        if lab["kubernetes.io/hostname"] == m["kubernetes.io/hostname"]:
            return 3
        for s, key in ((2, "topology.kubernetes.io/zone"), (1, "topology.kubernetes.io/region")):
            if lab[key] == m[key]:
                return s
        return 0

    pods = env.pods("chunkserver")
    best = max(score(p) for p in pods)
    assert best == 1, "placement should make the nearest chunkserver a same-region, other-zone one"
    return {p["metadata"]["name"] for p in pods if score(p) == best}


def test_snapshot_cr_nearest_chunkserver_and_restore_bytes(env: Release) -> None:
    cl = env.client()
    digests = _write_tree(cl, "/data")
    env.kubectl("apply", "-n", NS, "-f", str(REPO / "examples" / "snapshot.yaml"))
    snap = wait_for("Snapshot data-nightly Ready", lambda: env.condition("snapshot", "data-nightly"), 180)
    st = snap["status"]
    nearest = _expected_nearest(env)
    assert st["location"]["pod"] in nearest, (st["location"], nearest)
    assert st["location"]["node"] == "kgfs-n2" and st["location"]["zone"] == "zone-b", st["location"]
    assert st["files"] == len(digests)
    # the record's bytes are on that pod's volume (the local PV's host directory)
    pod = next(p for p in env.pods("chunkserver") if p["metadata"]["name"] == st["location"]["pod"])
    recs = stored_records(env.pv_path(pod))
    assert st["snapshotID"] in recs, f"no record {st['snapshotID']} on {pod['metadata']['name']}'s volume {env.pv_path(pod)}"
    assert recs[st["snapshotID"]][2] == st["recordBytes"], (st["recordBytes"], recs)
    # a second copy in another zone
    assert len(st["copies"]) == 2 and st["copies"][1]["zone"] != st["copies"][0]["zone"], st["copies"]

    env.kubectl("apply", "-n", NS, "-f", str(REPO / "examples" / "restore.yaml"))
    wait_for("Restore Ready", lambda: env.condition("restore", "data-nightly-restore"), 180)
    assert _read_tree(cl, "/data-restored", list(digests)) == digests
    assert _read_tree(cl, "/data", list(digests)) == digests


def test_master_pod_killed_comes_back_with_files_and_snapshots(env: Release) -> None:
    cl = env.client()
    names = [e["path"].rsplit("/", 1)[1] for e in cl.ls("/data")]
    before_files = _read_tree(cl, "/data", names)
    before_snaps = sorted(s["name"] for s in cl.snapshot_list())
    old = env.pods("master")[0]
    env.kubectl("delete", "pod", "-n", NS, old["metadata"]["name"], "--grace-period=0", "--force")
    wait_for("a new Ready master pod", lambda: [p for p in env.pods("master")
                                              if p["metadata"]["uid"] != old["metadata"]["uid"] and pod_ready(p)], 240)
    cl = env.client()
    # a restarted master learns where chunks are from the chunkservers' next heartbeats (GFS)
    wait_for("the new master to hear from every chunkserver", lambda: len(_live(cl)) == 3, 120)
    assert _read_tree(cl, "/data", names) == before_files and len(names) == 5
    assert sorted(s["name"] for s in cl.snapshot_list()) == before_snaps
    assert any("data-nightly" in n for n in before_snaps), before_snaps


def test_chunkserver_deleted_reads_work_and_chunks_rereplicate(env: Release) -> None:
    cl = env.client()
    digests = _write_tree(cl, "/cs-loss", n=4)
    victim = env.pods("chunkserver")[0]
    env.kubectl("delete", "pod", "-n", NS, victim["metadata"]["name"], "--grace-period=0", "--force")
    assert _read_tree(cl, "/cs-loss", list(digests)) == digests  # while it is gone
    wait_for("the master back at full replication",
             lambda: cl.status().get("under_replicated") == 0 and len(_live(cl)) == 3, 240)
    wait_for("every pod Ready again", env.all_ready, 240)
    assert _read_tree(cl, "/cs-loss", list(digests)) == digests


def _evict(env: Release, pod: str) -> subprocess.CompletedProcess[str]:
    body = json.dumps({"apiVersion": "policy/v1", "kind": "Eviction",
                       "metadata": {"name": pod, "namespace": NS}})
    return env.c.kubectl("create", "--raw", f"/api/v1/namespaces/{NS}/pods/{pod}/eviction", "-f", "-",
                         check=False, input=body, timeout=60)


def test_pdb_lets_one_chunkserver_go_at_a_time(env: Release) -> None:
    """The chunkservers' PodDisruptionBudget (maxUnavailable 1) as the eviction API (kubectl
    drain) honours it: one chunkserver may be evicted, a second not while the first is away."""
    wait_for("every pod Ready", env.all_ready, 240)

    def allowed() -> Any:
        pdbs = env.get("pdb", "-l", f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=chunkserver")
        return [p for p in pdbs["items"] if p.get("status", {}).get("disruptionsAllowed") == 1]

    wait_for("the chunkservers' PDB to allow one disruption", allowed, 120)
    first, second = (p["metadata"]["name"] for p in env.pods("chunkserver")[:2])
    r = _evict(env, first)
    assert r.returncode == 0, r.stderr
    r = _evict(env, second)
    assert r.returncode != 0 and "disruption budget" in r.stderr, (r.returncode, r.stderr)
    wait_for("every pod Ready again", env.all_ready, 300)


def test_operator_pod_deleted_during_snapshot_exactly_one(env: Release) -> None:
    cl = env.client()
    _write_tree(cl, "/op-crash", n=2)
    env.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(
        {"apiVersion": "kubegfs.io/v1alpha1", "kind": "Snapshot", "metadata": {"name": "op-crash"},
         "spec": {"path": "/op-crash", "copies": 1, "deletionPolicy": "Delete", "cluster": {"name": RELEASE}}}))
    op = env.pods("operator")[0]
    env.kubectl("delete", "pod", "-n", NS, op["metadata"]["name"], "--grace-period=0", "--force")
    snap = wait_for("Snapshot op-crash Ready after the operator restart",
                    lambda: env.condition("snapshot", "op-crash"), 300)
    same = [s for s in cl.snapshot_list() if s["path"] == "/op-crash"]
    assert len(same) == 1, same
    assert same[0]["id"] == snap["status"]["snapshotID"]
    env.kubectl("delete", "gsnap", "-n", NS, "op-crash", "--wait=true", "--timeout=120s")
    assert not [s for s in cl.snapshot_list() if s["path"] == "/op-crash"]


def test_prometheus_scrapes_the_pods_and_sees_the_snapshots(env: Release, tmp_path: Path) -> None:
    """Prometheus (Debian package, on the host) scrapes every pod the chart annotates for scraping
    (prometheus.io/scrape, port, path), with the chart's token, and the dashboard's snapshot
    queries return the snapshots the tests above took.

    Debian's Prometheus 2.42 is built without kubernetes_sd_configs ("field kubernetes_sd_configs
    not found in type config.ScrapeConfig"), so the targets come from the pods' annotations as
    kubernetes_sd's role=pod + the usual relabelling would make them, written to a file_sd file."""
    prom = _ensure_prometheus()
    port = free_port()
    # a snapshot taken by the operator pod that runs now (its counters live in that process)
    env.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(
        {"apiVersion": "kubegfs.io/v1alpha1", "kind": "Snapshot", "metadata": {"name": "prom-check"},
         "spec": {"path": "/data", "copies": 1, "cluster": {"name": RELEASE}}}))
    wait_for("Snapshot prom-check Ready", lambda: env.condition("snapshot", "prom-check"), 120)
    targets = []
    for comp in ("master", "chunkserver", "operator"):
        for pod in env.pods(comp):
            ann = pod["metadata"].get("annotations", {})
            assert ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/path") == "/metrics", ann
            assert ann.get("prometheus.io/scheme") == "https", ann  # TLS is on by default
            targets.append({"targets": [f"{pod['status']['podIP']}:{ann['prometheus.io/port']}"],
                            "labels": {"component": comp, "pod": pod["metadata"]["name"]}})
    (tmp_path / "targets.json").write_text(json.dumps(targets))
    cfg = {"global": {"scrape_interval": "2s", "scrape_timeout": "2s"},
           "scrape_configs": [{
               "job_name": "kubegfs", "honor_labels": True, "scheme": "https",
               "tls_config": {"ca_file": str(env.cacert()), "server_name": env.tls_server_name()},
               # the scrape-only credential: it can read /metrics and nothing else
               "authorization": {"credentials": env.token("metrics-token")},
               "file_sd_configs": [{"files": [str(tmp_path / "targets.json")]}]}]}
    (tmp_path / "prometheus.yml").write_text(json.dumps(cfg))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen([str(prom), f"--config.file={tmp_path / 'prometheus.yml'}",  # noqa: S603
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)

    def query(expr: str) -> list[dict[str, Any]]:
        r = requests.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=10)
        r.raise_for_status()
        return list(r.json()["data"]["result"])

    try:
        ups = wait_for("every kubegfs pod scraped and up", lambda: (
            res if len(res := query("up")) == 2 + CHUNKSERVERS and all(x["value"][1] == "1" for x in res)
            else None), 120)
        assert sorted(x["metric"]["component"] for x in ups) == sorted(
            ["master", "operator"] + ["chunkserver"] * CHUNKSERVERS), ups
        pods = {x["metric"]["pod"] for x in ups}
        assert pods == {p["metadata"]["name"] for c in ("master", "chunkserver", "operator") for p in env.pods(c)}
        # one series per pod: nothing is scraped twice
        assert len(query("count by (pod) (up) > 1")) == 0
        ok = wait_for("the operator's snapshot counters", lambda: query(
            f'sum(kubegfs_snapshots_total{{namespace="{NS}",result="success"}})'), 60)
        assert float(ok[0]["value"][1]) >= 1, ok
        assert query(f'kubegfs_snapshot_last_success_timestamp_seconds{{namespace="{NS}"}}')
        # the master and chunkservers are scraped too: the catalog holds the snapshots taken above
        assert query("sum(kubegfs_master_catalog_snapshots) >= 1")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def _ensure_prometheus() -> Path:
    found = shutil.which("prometheus")
    if not found:
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"],
                       capture_output=True, check=False, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = shutil.which("prometheus")
    assert found, "prometheus (the Debian package) is missing and could not be installed"
    return Path(found)


def test_helm_upgrade_rolls_pods_keeps_data_then_uninstall(env: Release) -> None:
    cl = env.client()
    files = sorted(e["path"] for e in cl.ls("/data"))
    old = env.pods("master")[0]["metadata"]["uid"]
    # a CRD of an older chart (one printer column fewer): Helm never upgrades crds/, the chart's
    # pre-upgrade hook Job does (templates/crds/upgrade-job.yaml)
    crd = json.loads(env.kubectl("get", "crd", "snapshots.kubegfs.io", "-o", "json"))
    want_cols = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    crd["spec"]["versions"][0]["additionalPrinterColumns"] = [
        c for c in crd["spec"]["versions"][0]["additionalPrinterColumns"] if c["name"] != "Reason"]
    env.kubectl("replace", "-f", "-", input=json.dumps(crd))
    env.helm("upgrade", RELEASE, str(CHART), "-n", NS, "-f", str(env.values_file),
             "--set", "master.deadAfter=7", "--wait", "--timeout", "8m")
    crd = json.loads(env.kubectl("get", "crd", "snapshots.kubegfs.io", "-o", "json"))
    assert [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]] == want_cols
    assert "Reason" in want_cols
    pods = wait_for("the master pod rolled, every pod Ready", lambda: env.all_ready() if
                    env.pods("master")[0]["metadata"]["uid"] != old else [], 300)
    master = next(p for p in pods if p["metadata"]["labels"]["app.kubernetes.io/component"] == "master")
    assert "--dead-after=7" in master["spec"]["containers"][0]["args"]
    cl = env.client()
    assert sorted(e["path"] for e in cl.ls("/data")) == files

    # snapshots with deletionPolicy Delete must go before their cluster does
    env.kubectl("delete", "gsnap,grestore", "-n", NS, "--all", "--wait=true", "--timeout=120s")
    env.helm("uninstall", RELEASE, "-n", NS, "--wait")
    def workloads() -> list[tuple[str, str]]:
        items = json.loads(env.kubectl("get", "-n", NS, "statefulsets,deployments,replicasets,pods,services",
                                       "-o", "json"))["items"]
        return [(o["kind"], o["metadata"]["name"]) for o in items]

    wait_for("no workload objects left", lambda: workloads() == [] or None, 180)
    # the StatefulSets' PVCs stay (documented: delete them to drop the data)
    assert len(env.get("pvc")["items"]) == 1 + CHUNKSERVERS
