"""Simulated nodes and pods (KWOK-style): Running, on the right node, reachable at their loopback IP."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from kubernetes import client

from kubegfs_dev import sim
from kubegfs_dev.pytest_plugin import Kubectl
from kubegfs_dev.util import wait_for

NODES = {  # name -> (zone, region)
    "sim-node-a": ("zone-a", "region-1"),
    "sim-node-b": ("zone-b", "region-1"),
    "sim-node-c": ("zone-c", "region-2"),
}
PODS = {  # name -> (node, loopback IP)
    "master-0": ("sim-node-a", "127.0.1.1"),
    "chunk-0": ("sim-node-a", "127.0.1.2"),
    "chunk-1": ("sim-node-b", "127.0.1.3"),
    "chunk-2": ("sim-node-c", "127.0.1.4"),
}


@pytest.fixture
def core(k8s_api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(k8s_api)


@pytest.fixture
def nodes(core: client.CoreV1Api) -> Iterator[dict[str, tuple[str, str]]]:
    for name, (zone, region) in NODES.items():
        sim.delete_node(core, name)  # leftovers of an interrupted run
        sim.create_node(core, name, zone=zone, region=region)
    yield NODES
    for name in NODES:
        sim.delete_node(core, name)


def test_nodes_have_topology_labels_and_are_ready(nodes: dict[str, tuple[str, str]],
                                                   core: client.CoreV1Api) -> None:
    listed = core.list_node(label_selector=f"{sim.SIM_LABEL}=true").items
    assert {n.metadata.name for n in listed} >= set(NODES)
    for n in listed:
        if n.metadata.name not in NODES:
            continue
        zone, region = NODES[n.metadata.name]
        assert n.metadata.labels[sim.HOSTNAME_LABEL] == n.metadata.name
        assert n.metadata.labels[sim.ZONE_LABEL] == zone
        assert n.metadata.labels[sim.REGION_LABEL] == region
        ready = [c for c in n.status.conditions if c.type == "Ready"]
        assert ready and ready[0].status == "True"
    zone_a = core.list_node(label_selector=f"{sim.ZONE_LABEL}=zone-a").items
    assert [n.metadata.name for n in zone_a] == ["sim-node-a"]


def test_pods_run_on_their_nodes_with_loopback_ips(
        nodes: dict[str, tuple[str, str]], core: client.CoreV1Api, k8s_namespace: str,
        kubectl: Kubectl) -> None:
    ns = k8s_namespace
    for name, (node, ip) in PODS.items():
        role = name.split("-")[0]
        pod = sim.create_pod(core, ns, name, node=node, pod_ip=ip,
                             labels={"app": "kubegfs", "role": role})
        assert pod.status.phase == "Running"

    for name, (node, ip) in PODS.items():
        pod = core.read_namespaced_pod(name, ns)
        assert pod.spec.node_name == node
        assert pod.status.phase == "Running"
        assert pod.status.pod_ip == ip
        assert [p.ip for p in pod.status.pod_ips] == [ip]
        conds = {c.type: c.status for c in pod.status.conditions}
        assert conds["Ready"] == "True" and conds["ContainersReady"] == "True"
        assert pod.status.container_statuses[0].state.running is not None
        assert pod.metadata.labels["role"] == name.split("-")[0]

    # The API server indexes spec.nodeName: field selectors work as with real kubelets.
    on_a = core.list_namespaced_pod(ns, field_selector="spec.nodeName=sim-node-a").items
    assert sorted(p.metadata.name for p in on_a) == ["chunk-0", "master-0"]
    running = core.list_namespaced_pod(ns, field_selector="status.phase=Running",
                                       label_selector="role=chunk").items
    assert len(running) == 3

    # kubectl shows the same thing.
    out = json.loads(kubectl("get", "pods", "-n", ns, "-o", "json").stdout)
    seen = {p["metadata"]["name"]: (p["spec"]["nodeName"], p["status"]["podIP"], p["status"]["phase"])
            for p in out["items"]}
    assert seen == {n: (node, ip, "Running") for n, (node, ip) in PODS.items()}

    # Delete with grace period 0: gone at once, no kubelet needed.
    sim.delete_pod(core, ns, "chunk-1")
    assert "chunk-1" not in {p.metadata.name for p in core.list_namespaced_pod(ns).items}


def test_pod_ip_reaches_a_real_process(nodes: dict[str, tuple[str, str]], core: client.CoreV1Api,
                                        k8s_namespace: str) -> None:
    """What the tests will do with kubegfs: start the real process on the pod's loopback IP."""
    ip = "127.0.1.9"

    class Hello(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"i am " + self.server.server_address[0].encode()  # type: ignore[union-attr]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with socket.socket() as s:
        s.bind((ip, 0))
        port = s.getsockname()[1]
    srv = ThreadingHTTPServer((ip, port), Hello)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        sim.create_pod(core, k8s_namespace, "web", node="sim-node-b", pod_ip=ip,
                       labels={"app": "web"},
                       containers=[{"name": "web", "image": "web:1",
                                    "ports": [{"containerPort": port}]}])
        pod = core.list_namespaced_pod(k8s_namespace, label_selector="app=web").items[0]
        target = f"http://{pod.status.pod_ip}:{pod.spec.containers[0].ports[0].container_port}/"
        r = requests.get(target, timeout=10)
        assert r.text == f"i am {ip}"
        # Readiness can flip without touching the phase (a failing probe) ...
        sim.set_ready(core, k8s_namespace, "web", False)
        pod = core.read_namespaced_pod("web", k8s_namespace)
        assert pod.status.phase == "Running"
        assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "False"
        assert pod.status.container_statuses[0].ready is False
        assert pod.status.pod_ip == ip
        sim.set_ready(core, k8s_namespace, "web", True)
        pod = core.read_namespaced_pod("web", k8s_namespace)
        assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "True"
        # ... and a pod marked failed is no longer Ready.
        sim.mark_failed(core, k8s_namespace, "web")
        pod = core.read_namespaced_pod("web", k8s_namespace)
        assert pod.status.phase == "Failed"
        assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "False"
    finally:
        srv.shutdown()
        srv.server_close()


def test_pod_deleted_with_namespace(nodes: dict[str, tuple[str, str]], core: client.CoreV1Api,
                                    k8s_api: client.ApiClient) -> None:
    ns = "sim-ns-delete"
    core.create_namespace({"metadata": {"name": ns}})
    sim.create_pod(core, ns, "p", node="sim-node-c", pod_ip="127.0.1.10")
    core.delete_namespace(ns)
    wait_for(lambda: not any(n.metadata.name == ns for n in core.list_namespace().items),
             timeout=120, what=f"namespace {ns} (with a bound pod) to be deleted")


def test_loopback_ip_allocator() -> None:
    ips = sim.LoopbackIPs()
    got = [ips.next() for _ in range(300)]
    assert got[0] == "127.0.1.1" and got[254] == "127.0.1.255" and got[255] == "127.0.2.0"
    assert len(set(got)) == 300
    with pytest.raises(ValueError):
        sim.LoopbackIPs("10.0.0.0")
