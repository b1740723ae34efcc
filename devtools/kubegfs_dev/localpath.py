"""Dynamic PersistentVolumes for the real-node cluster (:mod:`kubegfs_dev.cluster`): Rancher's
local-path-provisioner, built from its Go module by ``hack/controlplane/build.sh`` and run as a
pod, as on k3s and kind. Its StorageClass ``local-path`` is the cluster's default, so a
StatefulSet's claims bind to a directory made for them on the node the pod is scheduled to
(``WaitForFirstConsumer``), as ``local`` PersistentVolumes (``defaultVolumeType: local``); a
deleted claim's directory is removed (``reclaimPolicy: Delete``).

The provisioner makes and removes those directories with a short-lived helper pod on the node:
its image here is Debian's static busybox (``sh``, ``mkdir``, ``rm``), built from scratch like
the pause image. Both images are imported into every node's containerd and never pulled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

NAMESPACE = "local-path-storage"
STORAGE_CLASS = "local-path"
PROVISIONER = "rancher.io/local-path"
PROVISIONER_IMAGE = "localhost/kubegfs/local-path-provisioner:kubegfs-1"
HELPER_IMAGE = "localhost/kubegfs/local-path-helper:kubegfs-1"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
HELPER_APPLETS = ("sh", "mkdir", "rm", "chmod")
_SA = "local-path-provisioner-service-account"


def objects(nodes: Sequence[Any], node_dir: Callable[[Any], Path]) -> list[dict[str, Any]]:
    """The provisioner's namespace, RBAC, configuration, Deployment and default StorageClass;
    each node's volumes go under ``node_dir(node)/local-path``."""
    config = {"nodePathMap": [{"node": n.name, "paths": [str(node_dir(n) / "local-path")]} for n in nodes]}
    helper_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "helper-pod"},
                  "spec": {"containers": [{"name": "helper-pod", "image": HELPER_IMAGE,
                                           "imagePullPolicy": "Never"}]}}
    meta = {"namespace": NAMESPACE}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": _SA, **meta}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "local-path-provisioner-role", **meta},
         "rules": [{"apiGroups": [""], "resources": ["pods"],
                    "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "local-path-provisioner-bind", **meta},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "local-path-provisioner-role"},
         "subjects": [{"kind": "ServiceAccount", "name": _SA, "namespace": NAMESPACE}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "local-path-provisioner-role"},
         "rules": [{"apiGroups": [""], "resources": ["nodes", "persistentvolumeclaims", "configmaps", "pods",
                                                     "pods/log"], "verbs": ["get", "list", "watch"]},
                   {"apiGroups": [""], "resources": ["persistentvolumes"],
                    "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
                   {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
                   {"apiGroups": ["storage.k8s.io"], "resources": ["storageclasses"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "local-path-provisioner-bind"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": "local-path-provisioner-role"},
         "subjects": [{"kind": "ServiceAccount", "name": _SA, "namespace": NAMESPACE}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "local-path-config", **meta},
         "data": {"config.json": json.dumps(config),
                  "setup": 'set -eu\nmkdir -m 0777 -p "$VOL_DIR"\n',
                  "teardown": 'set -eu\nrm -rf "$VOL_DIR"\n',
                  "helperPod.yaml": json.dumps(helper_pod)}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "local-path-provisioner", **meta},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "local-path-provisioner"}},
                  "template": {
                      "metadata": {"labels": {"app": "local-path-provisioner"}},
                      "spec": {
                          "serviceAccountName": _SA,
                          "containers": [{
                              "name": "local-path-provisioner", "image": PROVISIONER_IMAGE,
                              "imagePullPolicy": "Never",
                              "command": ["/local-path-provisioner", "--debug", "start",
                                          "--config", "/etc/config/config.json", "--helper-image", HELPER_IMAGE],
                              "env": [{"name": "POD_NAMESPACE",
                                       "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                                      {"name": "CONFIG_MOUNT_PATH", "value": "/etc/config/"}],
                              "volumeMounts": [{"name": "config-volume", "mountPath": "/etc/config/"}]}],
                          "volumes": [{"name": "config-volume", "configMap": {"name": "local-path-config"}}]}}}},
        {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
         "metadata": {"name": STORAGE_CLASS,
                      "annotations": {"storageclass.kubernetes.io/is-default-class": "true",
                                      "defaultVolumeType": "local"}},
         "provisioner": PROVISIONER, "volumeBindingMode": "WaitForFirstConsumer", "reclaimPolicy": "Delete"},
    ]


def images(provisioner_bin: Path) -> list[tuple[str, list[tuple[Path, str]], str]]:
    """(reference, [(host file, path in the image)], user) of each image: static binaries only.
    The helper runs as root: it makes and removes directories the kubelet's root owns."""
    return [(PROVISIONER_IMAGE, [(provisioner_bin, "/local-path-provisioner")], "65535:65535"),
            (HELPER_IMAGE, [(BUSYBOX, f"/bin/{a}") for a in HELPER_APPLETS], "0:0")]
