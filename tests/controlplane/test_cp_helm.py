"""The helm built by build.sh installs a chart into the control plane, with a non-admin identity too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes import client

from kubegfs_dev.controlplane import ControlPlane, ControlPlaneError
from kubegfs_dev.util import wait_for

CHART_YAML = """\
apiVersion: v2
name: kubegfs-smoke
version: 0.1.0
"""
VALUES_YAML = "answer: 41\n"
TEMPLATE = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-cfg
  labels:
    app.kubernetes.io/managed-by: {{ .Release.Service }}
data:
  answer: {{ .Values.answer | quote }}
"""


@pytest.fixture
def chart(tmp_path: Path) -> Path:
    d = tmp_path / "kubegfs-smoke"
    (d / "templates").mkdir(parents=True)
    (d / "Chart.yaml").write_text(CHART_YAML)
    (d / "values.yaml").write_text(VALUES_YAML)
    (d / "templates" / "cm.yaml").write_text(TEMPLATE)
    return d


def test_helm_install_upgrade_uninstall(controlplane: ControlPlane, k8s_api: client.ApiClient,
                                        k8s_namespace: str, chart: Path) -> None:
    ns = k8s_namespace
    core = client.CoreV1Api(k8s_api)
    assert controlplane.helm("version", "--short").stdout.startswith("v3.")
    controlplane.helm("install", "smoke", str(chart), "-n", ns, "--wait")
    assert core.read_namespaced_config_map("smoke-cfg", ns).data == {"answer": "41"}
    controlplane.helm("upgrade", "smoke", str(chart), "-n", ns, "--set", "answer=42")
    assert core.read_namespaced_config_map("smoke-cfg", ns).data == {"answer": "42"}
    releases = json.loads(controlplane.helm("list", "-n", ns, "-o", "json").stdout)
    assert [(r["name"], r["revision"], r["status"]) for r in releases] == [("smoke", "2", "deployed")]
    controlplane.helm("uninstall", "smoke", "-n", ns)
    assert [c.metadata.name for c in core.list_namespaced_config_map(ns).items
            if c.metadata.name == "smoke-cfg"] == []


def test_helm_as_service_account_needs_rbac(controlplane: ControlPlane, k8s_api: client.ApiClient,
                                            k8s_namespace: str, chart: Path) -> None:
    ns = k8s_namespace
    kubeconfig = controlplane.service_account_kubeconfig(ns, "deployer")
    with pytest.raises(ControlPlaneError, match="forbidden"):
        controlplane.helm("install", "smoke", str(chart), "-n", ns, kubeconfig=kubeconfig)
    # Grant what helm needs in this namespace: its release Secrets plus the chart's ConfigMap.
    rbac = client.RbacAuthorizationV1Api(k8s_api)
    rbac.create_namespaced_role(ns, {
        "metadata": {"name": "deployer"},
        "rules": [{"apiGroups": [""], "resources": ["secrets", "configmaps"], "verbs": ["*"]}],
    })
    rbac.create_namespaced_role_binding(ns, {
        "metadata": {"name": "deployer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "deployer"},
        "subjects": [{"kind": "ServiceAccount", "name": "deployer", "namespace": ns}],
    })

    def installed() -> bool:
        r = controlplane.helm("install", "smoke", str(chart), "-n", ns, kubeconfig=kubeconfig,
                              check=False)
        if r.returncode != 0 and "forbidden" not in r.stderr:
            raise AssertionError(r.stderr)
        return r.returncode == 0

    wait_for(installed, what="helm install to be allowed")
    assert client.CoreV1Api(k8s_api).read_namespaced_config_map("smoke-cfg", ns).data == {"answer": "41"}
