"""kube-controller-manager runs: namespaces finish deleting, owner references cascade,
ServiceAccounts appear."""

from __future__ import annotations

from kubernetes import client
from kubernetes.client.rest import ApiException

from kubegfs_dev.util import wait_for


def _exists(fn: object, *args: object) -> bool:
    try:
        fn(*args)  # type: ignore[operator]
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return True


def test_namespace_deletion_completes(k8s_api: client.ApiClient) -> None:
    core = client.CoreV1Api(k8s_api)
    ns = "cp-delete-me"
    core.create_namespace({"metadata": {"name": ns}})
    for i in range(3):
        core.create_namespaced_config_map(ns, {"metadata": {"name": f"cm{i}"}})
    core.delete_namespace(ns)
    # Without the namespace controller it would stay Terminating forever.
    phase = core.read_namespace(ns).status.phase
    assert phase in ("Terminating", "Active")
    wait_for(lambda: not _exists(core.read_namespace, ns), timeout=120,
             what=f"namespace {ns} to disappear")


def test_default_service_account_and_root_ca_appear(k8s_api: client.ApiClient, k8s_namespace: str) -> None:
    core = client.CoreV1Api(k8s_api)
    wait_for(lambda: _exists(core.read_namespaced_service_account, "default", k8s_namespace),
             what="the default ServiceAccount")
    wait_for(lambda: _exists(core.read_namespaced_config_map, "kube-root-ca.crt", k8s_namespace),
             what="the kube-root-ca.crt ConfigMap")
    ca = core.read_namespaced_config_map("kube-root-ca.crt", k8s_namespace).data["ca.crt"]
    assert "BEGIN CERTIFICATE" in ca


def test_owner_references_cascade(k8s_api: client.ApiClient, k8s_namespace: str) -> None:
    core = client.CoreV1Api(k8s_api)
    owner = core.create_namespaced_config_map(k8s_namespace, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid,
           "blockOwnerDeletion": True}
    core.create_namespaced_config_map(k8s_namespace, {"metadata": {"name": "dependent",
                                                                   "ownerReferences": [ref]}})
    core.create_namespaced_config_map(k8s_namespace, {"metadata": {"name": "bystander"}})
    core.delete_namespaced_config_map("owner", k8s_namespace, propagation_policy="Foreground")
    wait_for(lambda: not _exists(core.read_namespaced_config_map, "dependent", k8s_namespace),
             timeout=120, what="the dependent to be garbage-collected")
    wait_for(lambda: not _exists(core.read_namespaced_config_map, "owner", k8s_namespace),
             timeout=120, what="the owner to finish foreground deletion")
    assert _exists(core.read_namespaced_config_map, "bystander", k8s_namespace)
