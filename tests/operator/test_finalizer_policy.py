"""The chart's MutatingAdmissionPolicy on the real kube-apiserver: a Snapshot or SnapshotSchedule
in a namespace the operator serves is stored with the operator's finalizer already on it (so kopf
handles it on its first event); a Restore, and any object elsewhere, is left as it was sent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from kubegfs_dev.controlplane import ControlPlane
from kubegfs_dev.stack import apply_crds
from kubegfs_dev.util import wait_for
from kubegfs_operator import FINALIZER, GROUP, VERSION

CHART = Path(__file__).resolve().parents[2] / "helm" / "kubegfs"
MAP_API = "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy"


def _snapshot(name: str, finalizers: list[str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if finalizers is not None:
        meta["finalizers"] = finalizers
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Snapshot", "metadata": meta,
            "spec": {"path": "/data", "cluster": {"name": "kubegfs"}}}


def test_policy_adds_the_finalizer_at_creation(controlplane: ControlPlane, k8s_api: client.ApiClient,
                                                 k8s_namespace: str) -> None:
    ns = k8s_namespace
    core, co = client.CoreV1Api(k8s_api), client.CustomObjectsApi(k8s_api)
    apply_crds(dict(os.environ), controlplane.kubeconfig)
    rendered = controlplane.helm(
        "template", "fp", str(CHART), "--namespace", ns, "--kube-version", "1.36.3", "--api-versions", MAP_API,
        "--show-only", "templates/operator/finalizer-policy.yaml", "--set", f"operator.watchNamespaces={{{ns}}}",
    ).stdout
    assert "kind: MutatingAdmissionPolicyBinding" in rendered
    other = f"{ns}-x"[:63]
    core.create_namespace({"metadata": {"name": other}})
    controlplane.kubectl("apply", "-f", "-", input=rendered)
    made: list[tuple[str, str, str]] = []

    def create(namespace: str, plural: str, body: dict[str, Any], dry: bool = False) -> list[str]:
        obj = co.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body,
                                                 **({"dry_run": "All"} if dry else {}))
        if not dry:
            made.append((namespace, plural, obj["metadata"]["name"]))
        return list(obj["metadata"].get("finalizers") or [])

    try:
        def in_effect() -> bool:
            try:
                return create(ns, "snapshots", _snapshot("probe"), dry=True) == [FINALIZER]
            except ApiException as exc:  # a new CRD is served a moment after it is Established
                if exc.status in (404, 503):
                    return False
                raise

        # a new policy takes effect once the API server has loaded it (dry runs are admitted too)
        wait_for(in_effect, what="the finalizer policy to take effect", timeout=60)
        assert create(ns, "snapshots", _snapshot("s1")) == [FINALIZER]
        assert create(ns, "snapshots", _snapshot("s2", ["example.com/keep"])) == ["example.com/keep", FINALIZER]
        assert create(ns, "snapshots", _snapshot("s3", [FINALIZER])) == [FINALIZER]  # never twice
        sched = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SnapshotSchedule", "metadata": {"name": "every-hour"},
                 "spec": {"schedule": "@hourly", "path": "/data", "cluster": {"name": "kubegfs"}}}
        assert create(ns, "snapshotschedules", sched) == [FINALIZER]
        restore = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Restore", "metadata": {"name": "r1"},
                   "spec": {"snapshotName": "s1", "cluster": {"name": "kubegfs"}}}
        assert create(ns, "restores", restore) == []  # the operator needs no finalizer on a Restore
        assert create(other, "snapshots", _snapshot("elsewhere")) == []  # not a namespace it serves
    finally:
        controlplane.kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered, check=False)
        for namespace, plural, name in made:  # no operator runs here to release them
            co.patch_namespaced_custom_object(GROUP, VERSION, namespace, plural, name, {"metadata": {"finalizers": None}})
        core.delete_namespace(other)
