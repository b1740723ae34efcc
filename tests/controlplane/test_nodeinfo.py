"""A chunkserver started by the chart reads its zone/region from its Node via the real API."""

import uuid

import yaml

from kubegfs.k8s_node import node_location
from kubegfs_dev import sim


def test_node_location_from_api(controlplane, k8s_namespace, tmp_path):
    from kubernetes import client

    api = controlplane.api_client()
    core = client.CoreV1Api(api)
    node = f"n-{uuid.uuid4().hex[:6]}"
    sim.create_node(core, node, zone="zone-q", region="region-w")
    kc = yaml.safe_load(controlplane.service_account_kubeconfig(k8s_namespace, "reader").read_text())
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text(kc["users"][0]["user"]["token"])
    (sa / "ca.crt").write_bytes(controlplane.ca_file.read_bytes())
    # without RBAC the lookup is refused: the process still starts, knowing only its node name
    loc = node_location(node, ip="127.0.0.9", sa_dir=sa, api=controlplane.url)
    assert (loc.node, loc.zone, loc.region, loc.ip) == (node, "", "", "127.0.0.9")
    rbac = client.RbacAuthorizationV1Api(api)
    rbac.create_cluster_role({"metadata": {"name": f"nodes-{k8s_namespace}"},
                              "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]})
    rbac.create_cluster_role_binding({
        "metadata": {"name": f"nodes-{k8s_namespace}"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": f"nodes-{k8s_namespace}"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": k8s_namespace}]})
    loc = node_location(node, ip="127.0.0.9", sa_dir=sa, api=controlplane.url)
    assert (loc.node, loc.zone, loc.region) == (node, "zone-q", "region-w")
