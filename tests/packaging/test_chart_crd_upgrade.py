"""The CRD upgrade path: Helm installs crds/ once and never upgrades them, so the chart's
pre-upgrade hook Job (templates/crds/upgrade-job.yaml) applies them with
``kubegfs-operator-crds`` (operator/kubegfs_operator/crds.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_helm import CHART, by_kind, one, pss_restricted_violations, rbac_wildcards

CRD_FILES = sorted((CHART / "crds").glob("*.yaml"))
HOOK = "helm.sh/hook"


def chart_crds() -> dict[str, dict[str, Any]]:
    return {f.stem + ".json": yaml.safe_load(f.read_text()) for f in CRD_FILES}


def put_crd(kubectl, crd: dict[str, Any]) -> None:
    """``crd`` in place of whatever is installed: replaced, never deleted (that would delete every
    object of the kind, in every namespace)."""
    now = kubectl("get", "crd", crd["metadata"]["name"], "-o", "json", check=False)
    if now.returncode != 0:
        kubectl("create", "-f", "-", input=json.dumps(crd))
        return
    rv = json.loads(now.stdout)["metadata"]["resourceVersion"]
    kubectl("replace", "-f", "-", input=json.dumps(crd | {"metadata": crd["metadata"] | {"resourceVersion": rv}}))


def install_older_snapshot_crd(kubectl) -> tuple[dict[str, Any], str]:
    """The Snapshot CRD as an older chart had it (a printer column and a spec field fewer), with a
    label someone else added; returns the chart's current one and its name."""
    snap = chart_crds()["kubegfs.io_snapshots.json"]
    old = json.loads(json.dumps(snap))
    v = old["spec"]["versions"][0]
    v["additionalPrinterColumns"] = [c for c in v["additionalPrinterColumns"] if c["name"] != "Reason"]
    del v["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["deletionPolicy"]
    put_crd(kubectl, old)
    kubectl("label", "crd", snap["metadata"]["name"], "team=storage", "--overwrite")
    return snap, snap["metadata"]["name"]


def assert_current(kubectl, snap: dict[str, Any]) -> None:
    got = json.loads(kubectl("get", "crd", snap["metadata"]["name"], "-o", "json").stdout)
    cols = [c["name"] for c in got["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert cols == [c["name"] for c in snap["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert "deletionPolicy" in got["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]
    assert got["metadata"]["labels"]["team"] == "storage"


def run_crds_command(crd_dir: Path, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
    """What the hook's container runs (``kubegfs-operator-crds /crds``), here as a local process."""
    return subprocess.run([sys.executable, "-m", "kubegfs_operator.crds", str(crd_dir)], capture_output=True,
                          text=True, timeout=120, check=False, env={"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin"})


def hook_objects(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every hook but `helm test`'s pod."""
    return [o for o in objs if (o["metadata"].get("annotations") or {}).get(HOOK, "test") != "test"]


def test_the_hook_applies_exactly_the_charts_crds_before_an_upgrade(render):
    objs = render()
    hooks = hook_objects(objs)
    assert {o["kind"] for o in hooks} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
                                          "NetworkPolicy", "Job"}
    for o in hooks:  # before an upgrade only (install applies crds/ itself), gone once it worked
        ann = o["metadata"]["annotations"]
        assert ann[HOOK] == "pre-upgrade", o["metadata"]["name"]
        assert ann["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
        want = "-5" if o["kind"] == "Job" else "-10"  # everything the Job needs exists before it
        assert ann["helm.sh/hook-weight"] == want, o["kind"]
    # the ConfigMap holds every file of crds/, as JSON, unchanged
    cm = one(hooks, "ConfigMap", "crds")
    assert {k: json.loads(v) for k, v in cm["data"].items()} == chart_crds()
    job = one(hooks, "Job", "crds")
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["command"] == ["kubegfs-operator-crds", "/crds"]
    assert c["image"] == one(objs, "Deployment", "operator")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert {"name": "crds", "configMap": {"name": cm["metadata"]["name"]}} in spec["volumes"]
    assert spec["restartPolicy"] == "Never" and spec["serviceAccountName"] == one(hooks, "ServiceAccount")["metadata"]["name"]
    assert pss_restricted_violations(spec) == []
    # RBAC: the kubegfs CRDs by name, create (which RBAC cannot limit by name), nothing else
    role = one(hooks, "ClusterRole", "crds")
    assert rbac_wildcards([role]) == []
    names = sorted(d["metadata"]["name"] for d in chart_crds().values())
    assert role["rules"] == [
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "resourceNames": names, "verbs": ["get", "update"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["create"]}]
    binding = one(hooks, "ClusterRoleBinding", "crds")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": spec["serviceAccountName"], "namespace": "kubegfs"}]
    # the release's default deny covers its pod: the API server is all it may reach
    np = one(hooks, "NetworkPolicy", "crds")
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert {p["port"] for r in np["spec"]["egress"] for p in r["ports"]} == {443, 6443}
    assert "ingress" not in np["spec"]


def test_the_hook_can_be_turned_off(render):
    objs = render("--set", "crds.upgradeJob.enabled=false", "--set", "crds.upgradeJob.priorityClassName=x")
    assert hook_objects(objs) == []
    assert by_kind(objs, "Job") == []


def test_bad_input_changes_nothing(tmp_path):
    """Anything but a kubegfs.io CRD is refused before the API server is called (exit 2)."""
    for name, doc in (("other.json", {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                                      "metadata": {"name": "backups.velero.io"},
                                      "spec": {"group": "velero.io", "names": {"plural": "backups"}}}),
                      ("role.json", {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                                     "metadata": {"name": "x"}})):
        d = tmp_path / name.split(".")[0]
        d.mkdir()
        (d / name).write_text(json.dumps(doc))
        r = subprocess.run([sys.executable, "-m", "kubegfs_operator.crds", str(d)], capture_output=True, text=True,
                           timeout=60, check=False, env={"KUBECONFIG": str(tmp_path / "none"), "PATH": "/usr/bin"})
        assert r.returncode == 2 and "kubegfs-operator-crds: error:" in r.stderr and name in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1  # one line, no traceback


class FakeApi:
    def __init__(self, existing: dict[str, dict[str, Any]], conflicts: int = 0) -> None:
        self.objs = existing
        self.conflicts = conflicts
        self.calls: list[tuple[str, str]] = []

    def get(self, name: str) -> dict[str, Any] | None:
        return self.objs.get(name)

    def create(self, body: dict[str, Any]) -> None:
        self.calls.append(("create", body["metadata"]["name"]))
        self.objs[body["metadata"]["name"]] = body

    def replace(self, name: str, body: dict[str, Any]) -> None:
        if self.conflicts:
            self.conflicts -= 1
            raise RuntimeError("409")
        assert body["metadata"]["resourceVersion"] == self.objs[name]["metadata"]["resourceVersion"]
        self.calls.append(("replace", name))
        self.objs[name] = body


def test_apply_creates_replaces_keeps_foreign_labels_and_retries_conflicts():
    from kubegfs_operator.crds import apply

    new = list(chart_crds().values())
    old = json.loads(json.dumps(new[0]))
    old["metadata"].update(resourceVersion="7", labels={"team": "storage", "app.kubernetes.io/name": "old"})
    old["spec"]["versions"][0]["additionalPrinterColumns"] = []
    name0 = old["metadata"]["name"]
    api = FakeApi({name0: old}, conflicts=2)
    done = apply(api, new, lambda e: str(e) == "409")
    assert done[0] == f"updated {name0}" and all(d.startswith("created ") for d in done[1:])
    assert api.calls[0] == ("replace", name0) and len(api.calls) == len(new)
    got = api.objs[name0]
    assert got["spec"] == new[0]["spec"]
    assert got["metadata"]["labels"] == {"team": "storage", "app.kubernetes.io/name": "kubegfs",
                                         "app.kubernetes.io/part-of": "kubegfs"}  # the chart's keys win
    with pytest.raises(RuntimeError):  # a conflict that never clears is an error, not a loop
        apply(FakeApi({name0: old}, conflicts=99), new[:1], lambda e: str(e) == "409")


def test_the_hook_upgrades_an_old_crd_with_its_own_rbac(controlplane, k8s_namespace, kubectl, helm_cmd, tmp_path):
    """On the real API server: the chart's previous Snapshot CRD (a printer column and a spec field
    fewer) is replaced by the hook's command running as the hook's ServiceAccount, with only the
    RBAC the chart gives it, and that account can touch no other CRD."""
    ns = k8s_namespace
    rendered = helm_cmd("template", "kg", str(CHART), "--namespace", ns,
                        "--show-only", "templates/crds/upgrade-job.yaml").stdout
    objs = [d for d in yaml.safe_load_all(rendered) if d]
    snap, name = install_older_snapshot_crd(kubectl)
    # what Helm creates before the Job (weight -10), then the Job's command as its account
    for o in objs:
        if o["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap"):
            kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(o))
    sa = one(objs, "ServiceAccount")["metadata"]["name"]
    cfg = controlplane.service_account_kubeconfig(ns, sa, create=False)
    crd_dir = tmp_path / "crds"
    crd_dir.mkdir()
    for key, text in one(objs, "ConfigMap")["data"].items():
        (crd_dir / key).write_text(text)
    try:
        for _ in range(2):  # and again: nothing changes, nothing fails
            r = run_crds_command(crd_dir, cfg)
            assert r.returncode == 0, r.stderr
            assert f"updated {name}" in r.stdout
        assert_current(kubectl, snap)
        for verb, what in (("update", "customresourcedefinitions/backups.velero.io"),
                           ("delete", f"customresourcedefinitions/{name}"),
                           ("get", "secrets")):
            can = kubectl("auth", "can-i", verb, what, "-n", ns, kubeconfig=cfg, check=False)
            assert can.stdout.strip() == "no", (verb, what)
    finally:
        for o in objs:
            if o["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                kubectl("delete", o["kind"].lower(), o["metadata"]["name"], "--ignore-not-found")
        put_crd(kubectl, snap)  # leave the current CRD for the other tests


def previous_chart(dest: Path) -> Path:
    """The chart as it was before the CRD-upgrade hook: the first parent of the commit that added it."""
    repo = CHART.parents[1]
    added = subprocess.run(["git", "-C", str(repo), "log", "--diff-filter=A", "--format=%H", "-1", "--",
                            "helm/kubegfs/templates/crds/upgrade-job.yaml"], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert added, "no commit added templates/crds/upgrade-job.yaml"
    archive = subprocess.run(["git", "-C", str(repo), "archive", f"{added}^", "helm/kubegfs"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "helm" / "kubegfs"


def test_helm_upgrade_from_the_previous_chart_upgrades_the_crds(controlplane, k8s_namespace, kubectl, tmp_path):
    """A real ``helm upgrade`` from the chart before the hook existed: Helm creates the hook's
    objects in weight order and waits for the Job. The local control plane has no Job controller
    and no kubelet, so the test is both: when the Job appears it runs the Job's command with the
    mounted ConfigMap's files as the Job's ServiceAccount, then marks the Job complete. The older
    CRD comes back current, and every hook object is gone afterwards (hook-succeeded)."""
    import threading
    import time
    from datetime import UTC, datetime

    ns, rel = k8s_namespace, "kg"
    prev = previous_chart(tmp_path)
    assert not (prev / "templates" / "crds").exists()
    snap, name = install_older_snapshot_crd(kubectl)
    job_name = f"{rel}-kubegfs-crds"
    ran: list[subprocess.CompletedProcess[str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def play_job_controller() -> None:
        try:
            while not stop.is_set():
                got = kubectl("get", "job", job_name, "-n", ns, "-o", "json", check=False)
                if got.returncode == 0:
                    break
                time.sleep(0.3)
            else:
                return
            job = json.loads(got.stdout)
            spec = job["spec"]["template"]["spec"]
            cm_name = next(v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v)
            cm = json.loads(kubectl("get", "configmap", cm_name, "-n", ns, "-o", "json").stdout)
            crd_dir = tmp_path / "mounted"
            crd_dir.mkdir()
            for key, text in cm["data"].items():
                (crd_dir / key).write_text(text)
            cfg = controlplane.service_account_kubeconfig(ns, spec["serviceAccountName"], create=False)
            r = run_crds_command(crd_dir, cfg)
            ran.append(r)
            now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            ok = r.returncode == 0
            conds = ([{"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached",
                       "message": "", "lastTransitionTime": now, "lastProbeTime": now},
                      {"type": "Complete", "status": "True", "reason": "CompletionsReached",
                       "message": "", "lastTransitionTime": now, "lastProbeTime": now}] if ok else
                     [{"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded",
                       "message": r.stderr[-200:], "lastTransitionTime": now, "lastProbeTime": now},
                      {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                       "message": r.stderr[-200:], "lastTransitionTime": now, "lastProbeTime": now}])
            status = {"startTime": now, "conditions": conds, "succeeded" if ok else "failed": 1}
            if ok:
                status["completionTime"] = now
            kubectl("patch", "job", job_name, "-n", ns, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": status}))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)

    t = threading.Thread(target=play_job_controller, daemon=True)
    try:
        controlplane.helm("install", rel, str(prev), "--namespace", ns, "--set", "chunkservers.replicas=1")
        t.start()
        controlplane.helm("upgrade", rel, str(CHART), "--namespace", ns, "--set", "chunkservers.replicas=1",
                          "--timeout", "120s")
        t.join(30)
        assert not errors, errors
        assert ran and ran[0].returncode == 0, ran and ran[0].stderr
        assert f"updated {name}" in ran[0].stdout
        assert_current(kubectl, snap)
        # the hook's objects are gone once it succeeded; the release is at revision 2
        sel = f"app.kubernetes.io/instance={rel},app.kubernetes.io/component=crds"
        left = json.loads(kubectl("get", "jobs,configmaps,serviceaccounts,networkpolicies", "-n", ns, "-l", sel,
                                  "-o", "json").stdout)["items"]
        assert left == [] and json.loads(kubectl("get", "clusterroles", "-l", sel, "-o", "json").stdout)["items"] == []
        assert "REVISION: 2" in controlplane.helm("status", rel, "--namespace", ns).stdout
    finally:
        stop.set()
        controlplane.helm("uninstall", rel, "--namespace", ns, check=False)
        put_crd(kubectl, snap)
