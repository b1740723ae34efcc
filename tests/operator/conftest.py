import os
import uuid

import pytest

from kubegfs_dev.stack import K8sStack, NodeSpec, PodSpec

# A master on node "m" (zone za, region r1) and chunkserver pods at increasing distance:
# same node, same zone, same region (zone zb), and another region (zc/r2; reached by IP prefix).
NODES = [NodeSpec("m", "za", "r1"), NodeSpec("a2", "za", "r1"), NodeSpec("b", "zb", "r1"),
         NodeSpec("c", "zc", "r2")]


def make_stack(controlplane, namespace, tmp_path):
    sfx = uuid.uuid4().hex[:5]
    nodes = [NodeSpec(f"{n.name}-{sfx}", n.zone, n.region) for n in NODES]
    m, a2, b, c = (n.name for n in nodes)
    return K8sStack(
        controlplane, namespace, tmp_path, nodes,
        master=PodSpec("kubegfs-master-0", m, "127.0.20.1"),
        chunkservers=[PodSpec("cs-same-node", m, "127.0.20.2"), PodSpec("cs-same-zone", a2, "127.0.21.1"),
                      PodSpec("cs-same-region", b, "127.0.22.1"), PodSpec("cs-far", c, "127.0.20.9")],
    )


def run_stack(st):
    try:
        st.start()
        yield st
    finally:
        st.stop()
        if st.operator_log.exists():
            print("---- operator log tail ----\n" + st.operator_log.read_text()[-4000:])


@pytest.fixture
def stack(controlplane, k8s_namespace, tmp_path):
    yield from run_stack(make_stack(controlplane, k8s_namespace, tmp_path))


@pytest.fixture
def long_stack(controlplane, k8s_api, tmp_path):
    """A stack in a namespace of the longest legal name (63 characters)."""
    from kubernetes import client

    core = client.CoreV1Api(k8s_api)
    ns = ("t-long-" + os.urandom(4).hex() + "-" + "n" * 63)[:63]
    core.create_namespace({"metadata": {"name": ns}})
    try:
        yield from run_stack(make_stack(controlplane, ns, tmp_path))
    finally:
        core.delete_namespace(ns, propagation_policy="Background")
