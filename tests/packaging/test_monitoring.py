"""The chart's monitoring against real parts: a Prometheus (Debian package) started here scrapes a
real operator, master and chunkservers (kubegfs_dev.stack.K8sStack on the local control plane);
after Snapshot and Restore resources (one of each failing on purpose), a copy-on-write append,
the `helm test` script and a chunkserver killed, EVERY PromQL expression of the Grafana dashboard
and of the alert rules must return data. promtool checks and unit-tests the rules file."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from kubegfs_dev.stack import K8sStack, NodeSpec, PodSpec
from kubegfs_dev.util import free_port, wait_for

CHART = Path(__file__).resolve().parents[2] / "helm" / "kubegfs"
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"
# Grafana's variables, as the dashboard would send them
GRAFANA_VARS = {"$__rate_interval": "1m", "$namespace": ".*"}


def dashboard_exprs() -> list[tuple[str, str]]:
    d = json.loads(DASHBOARD.read_text())
    out = []
    for p in d["panels"]:
        for t in p.get("targets") or []:
            out.append((f"{p['title']} [{t['refId']}]", t["expr"]))
    return out


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def grafana(expr: str) -> str:
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def inner(expr: str) -> str:
    """An alert expression without its threshold: the series it compares (`X > 0` -> `X`)."""
    e = re.sub(r"\s*(>|<|>=|<=|==|!=)\s*[0-9.e+ *]+$", "", expr.strip())
    assert e != expr.strip(), f"no threshold to strip in {expr}"
    return e


def test_promtool_checks_and_unit_tests_the_rules(prometheus_bins):
    _, promtool = prometheus_bins
    r = subprocess.run([str(promtool), "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([str(promtool), "test", "rules", "alerts_test.yaml"], cwd=ALERTS.parent,
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    # every alert of the file is unit-tested
    tested = set(re.findall(r"alertname: (\w+)", (ALERTS.parent / "alerts_test.yaml").read_text()))
    assert tested == {a for a, _ in alert_exprs()}


NODES = [NodeSpec("pm", "za", "r1"), NodeSpec("pa", "za", "r1"), NodeSpec("pb", "zb", "r1"),
         NodeSpec("pc", "zc", "r2")]


@pytest.fixture
def stack(controlplane, k8s_namespace, tmp_path):
    sfx = uuid.uuid4().hex[:5]
    nodes = [NodeSpec(f"{n.name}-{sfx}", n.zone, n.region) for n in NODES]
    m, a, b, c = (n.name for n in nodes)
    st = K8sStack(controlplane, k8s_namespace, tmp_path, nodes,
                  master=PodSpec("kubegfs-master-0", m, "127.0.40.1"),
                  chunkservers=[PodSpec("kubegfs-chunkserver-0", m, "127.0.40.2"),
                                PodSpec("kubegfs-chunkserver-1", a, "127.0.41.1"),
                                PodSpec("kubegfs-chunkserver-2", b, "127.0.42.1"),
                                PodSpec("kubegfs-chunkserver-3", c, "127.0.43.1")])
    try:
        st.start()
        yield st
    finally:
        st.stop()


class Prometheus:
    def __init__(self, binary: Path, workdir: Path, stack: K8sStack) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        auth = {"credentials": stack.cluster.token}  # type Bearer: Authorization: Bearer <token>
        cfg = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                # honor_labels: the operator's `namespace` label is the Snapshot's namespace
                {"job_name": "kubegfs-operator", "honor_labels": True, "authorization": auth,
                 "static_configs": [{"targets": [f"127.0.0.1:{stack.metrics_port}"]}]},
                {"job_name": "kubegfs-master", "honor_labels": True, "authorization": auth,
                 "static_configs": [{"targets": [f"{stack.master_pod.ip}:{stack.cluster.master.port}"]}]},
                {"job_name": "kubegfs-chunkserver", "honor_labels": True, "authorization": auth,
                 "static_configs": [{"targets": [f"{p.host}:{p.port}" for p in stack.cs_procs.values()]}]},
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [str(binary), f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--web.enable-lifecycle", "--storage.tsdb.retention.time=1h"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for(self._ready, timeout=60, what="prometheus /-/ready")
        except TimeoutError:
            self.stop()
            pytest.fail("prometheus did not start:\n" + self.log.read_text()[-3000:])

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail("prometheus exited:\n" + self.log.read_text()[-3000:])
        try:
            return requests.get(f"{self.url}/-/ready", timeout=1).ok
        except requests.RequestException:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.ok and body["status"] == "success", f"{expr}: {body}"
        return list(body["data"]["result"])

    def targets_up(self) -> bool:
        res = self.query("up")
        return len(res) == 6 and all(x["value"][1] == "1" for x in res)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def snapshot_cr(name: str, path: str) -> str:
    return yaml.safe_dump({"apiVersion": "kubegfs.io/v1alpha1", "kind": "Snapshot", "metadata": {"name": name},
                           "spec": {"path": path, "copies": 2}})


def finished(stack: K8sStack, plural: str, name: str, want: str = "Ready") -> None:
    wait_for(lambda: stack.condition(plural, name, want) == "True", timeout=60, what=f"{plural}/{name} {want}")


def test_every_dashboard_and_alert_expression_returns_data(stack, prometheus_bins, tmp_path):
    prom = Prometheus(prometheus_bins[0], tmp_path, stack)
    try:
        wait_for(prom.targets_up, timeout=30, what="all 6 targets up (operator, master, 4 chunkservers)")

        # Snapshot and Restore resources through the operator, one Snapshot failing on purpose
        c = stack.cluster.client()
        c.mkdir("/data/sub", parents=True)
        c.put("/data/a", b"alpha" * 10_000)
        c.put("/data/sub/b", bytes(range(256)) * 100)
        stack.kubectl("apply", "-f", "-", input=snapshot_cr("s1", "/data"))
        stack.kubectl("apply", "-f", "-", input=snapshot_cr("missing", "/no/such/dir"))
        stack.kubectl("apply", "-f", "-", input=yaml.safe_dump({  # fails: its Snapshot never appears
            "apiVersion": "kubegfs.io/v1alpha1", "kind": "Restore", "metadata": {"name": "orphan"},
            "spec": {"snapshotName": "never-made", "timeoutSeconds": 2}}))
        stack.kubectl("apply", "-f", "-", input=yaml.safe_dump({  # a Snapshot every 2 seconds, 2 kept
            "apiVersion": "kubegfs.io/v1alpha1", "kind": "SnapshotSchedule", "metadata": {"name": "often"},
            "spec": {"path": "/data", "schedule": "*/2 * * * * *", "retention": {"keepLast": 2}}}))
        finished(stack, "snapshots", "s1")
        finished(stack, "snapshots", "missing", "Failed")
        wait_for(lambda: (stack.get("snapshotschedules", "often").get("status") or {}).get("kept", 0) >= 1,
                 timeout=60, what="a Ready run of the schedule")
        c.put("/data/a", b"more", append=True)  # first append to a shared chunk: copy-on-write clone
        stack.kubectl("apply", "-f", "-", input=yaml.safe_dump({
            "apiVersion": "kubegfs.io/v1alpha1", "kind": "Restore", "metadata": {"name": "r1"},
            "spec": {"snapshotName": "s1", "targetPath": "/restored"}}))
        finished(stack, "restores", "r1")
        finished(stack, "restores", "orphan", "Failed")
        assert c.get("/restored/a") == b"alpha" * 10_000

        # the `helm test` pod's script, run here against the same master with the kubegfs CLI
        env = dict(os.environ, KUBEGFS_MASTER=stack.cluster.master_url, KUBEGFS_TOKEN=stack.cluster.token,
                   TMPDIR=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
        r = subprocess.run(["/bin/sh", "-ec", (CHART / "files" / "helm-test.sh").read_text()], env=env,
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 0 and "OK:" in r.stdout, r.stdout + r.stderr

        # a chunkserver dies: the master marks it dead and re-replicates its chunks
        stack.cluster.kill(stack.cs_procs["kubegfs-chunkserver-3"])
        wait_for(lambda: prom.query('kubegfs_master_chunkservers{state="dead"} > 0')
                 and prom.query("kubegfs_rereplications_total"), timeout=60,
                 what="Prometheus to see the dead chunkserver and a re-replication")
        time.sleep(2)  # a couple more scrapes so every rate() has two samples after the last change

        empty = []
        for title, expr in dashboard_exprs():
            if not prom.query(grafana(expr)):
                empty.append(f"dashboard {title}: {expr}")
        # alert expressions: the full expression where the test provoked the condition; those that
        # are legitimately empty on a healthy system (no corrupt replicas, a recent snapshot, ...)
        # must still have their series: the expression without its threshold returns data
        thresholded = []
        for alert, expr in alert_exprs():
            if prom.query(expr):
                continue
            thresholded.append(alert)
            if not prom.query(inner(expr)):
                empty.append(f"alert {alert}: {inner(expr)}")
        assert not empty, "expressions without data:\n" + "\n".join(empty)
        # the failures and the dead chunkserver provoked above do fire their alerts' expressions
        assert not {"KubegfsSnapshotFailed", "KubegfsRestoreFailed", "KubegfsChunkserverDown"} & set(thresholded)
        print(f"\nalert expressions evaluated without their threshold (healthy = empty): {thresholded}")
    finally:
        prom.stop()
