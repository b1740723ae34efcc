"""Non-admin identities get exactly what RBAC grants them."""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubegfs_dev.controlplane import ControlPlane
from kubegfs_dev.pytest_plugin import Kubectl
from kubegfs_dev.util import wait_for


def _grant_configmap_read(rbac: client.RbacAuthorizationV1Api, ns: str, subject: dict[str, str]) -> None:
    rbac.create_namespaced_role(ns, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "cm-reader"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]}],
    })
    rbac.create_namespaced_role_binding(ns, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "cm-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
        "subjects": [subject],
    })


def _status(fn: object, *args: object, **kw: object) -> int:
    try:
        fn(*args, **kw)  # type: ignore[operator]
    except ApiException as e:
        return int(e.status)
    return 200


def test_service_account_gets_only_what_it_was_granted(
        controlplane: ControlPlane, k8s_api: client.ApiClient, k8s_namespace: str,
        kubectl: Kubectl) -> None:
    ns = k8s_namespace
    admin_core = client.CoreV1Api(k8s_api)
    admin_core.create_namespaced_config_map(ns, {"metadata": {"name": "visible"}, "data": {"k": "v"}})
    kubeconfig = controlplane.service_account_kubeconfig(ns, "operator")

    with controlplane.api_client(kubeconfig) as sa_api:
        core = client.CoreV1Api(sa_api)
        # Before any binding: authenticated, but denied.
        assert _status(core.list_namespaced_config_map, ns) == 403
        _grant_configmap_read(client.RbacAuthorizationV1Api(k8s_api), ns,
                              {"kind": "ServiceAccount", "name": "operator", "namespace": ns})
        # RBAC changes apply without restarts (the authorizer's informer may lag a moment).
        def listed() -> list[client.V1ConfigMap] | None:
            try:
                return list(core.list_namespaced_config_map(ns).items)
            except ApiException as e:
                if e.status != 403:
                    raise
                return None

        items = wait_for(listed, what="the RoleBinding to take effect")
        assert "visible" in {c.metadata.name for c in items}
        assert core.read_namespaced_config_map("visible", ns).data == {"k": "v"}
        # Not granted: writes, other resources, other namespaces, cluster scope.
        assert _status(core.create_namespaced_config_map, ns, {"metadata": {"name": "x"}}) == 403
        assert _status(core.delete_namespaced_config_map, "visible", ns) == 403
        assert _status(core.list_namespaced_secret, ns) == 403
        assert _status(core.list_namespaced_config_map, "default") == 403
        assert _status(core.list_node) == 403

    # kubectl sees the same identity and the same answers.
    who = json.loads(kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:operator"
    assert kubectl("auth", "can-i", "list", "configmaps", "-n", ns,
                   kubeconfig=kubeconfig, check=False).stdout.strip() == "yes"
    assert kubectl("auth", "can-i", "create", "configmaps", "-n", ns,
                   kubeconfig=kubeconfig, check=False).stdout.strip() == "no"
    denied = kubectl("get", "secrets", "-n", ns, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()


def test_client_certificate_user_is_not_admin(
        controlplane: ControlPlane, k8s_api: client.ApiClient, k8s_namespace: str,
        kubectl: Kubectl) -> None:
    kubeconfig = controlplane.user_kubeconfig("alice", groups=["kubegfs-testers"])
    who = json.loads(kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout)
    assert who["status"]["userInfo"]["username"] == "alice"
    assert "kubegfs-testers" in who["status"]["userInfo"]["groups"]
    assert "system:masters" not in who["status"]["userInfo"]["groups"]
    assert kubectl("auth", "can-i", "list", "configmaps", "-n", k8s_namespace,
                   kubeconfig=kubeconfig, check=False).stdout.strip() == "no"
    # Grant by group, check it applies.
    _grant_configmap_read(client.RbacAuthorizationV1Api(k8s_api), k8s_namespace,
                          {"kind": "Group", "name": "kubegfs-testers",
                           "apiGroup": "rbac.authorization.k8s.io"})
    wait_for(lambda: kubectl("auth", "can-i", "list", "configmaps", "-n", k8s_namespace,
                             kubeconfig=kubeconfig, check=False).stdout.strip() == "yes",
             what="the group RoleBinding to take effect")
    assert kubectl("auth", "can-i", "delete", "configmaps", "-n", k8s_namespace,
                   kubeconfig=kubeconfig, check=False).stdout.strip() == "no"


def test_user_kubeconfig_refuses_system_masters(controlplane: ControlPlane) -> None:
    with pytest.raises(ValueError):
        controlplane.user_kubeconfig("mallory", groups=["system:masters"])
