"""Reading the node's topology: IPv6 API addresses and a loud failure when it cannot be read."""

import socket

import pytest

from kubegfs.k8s_node import TopologyUnavailable, api_base, in_cluster_api, node_location


@pytest.mark.parametrize(("host", "url"), [
    ("10.96.0.1", "https://10.96.0.1:443"),
    ("fd00:10:96::1", "https://[fd00:10:96::1]:443"),
    ("[fd00::1]", "https://[fd00::1]:443"),
    ("kubernetes.default.svc", "https://kubernetes.default.svc:443"),
])
def test_api_base_brackets_ipv6(host, url):
    assert api_base(host, "443") == url


def test_outside_a_pod_is_an_error(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(TopologyUnavailable, match="--topology-from-node"):
        in_cluster_api()


def test_unreachable_api_is_an_error_after_retrying(tmp_path):
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_text("")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(TopologyUnavailable, match="within 1s"):
            node_location("n1", sa_dir=tmp_path, api=f"https://127.0.0.1:{port}", timeout=1.0)
