"""The chunkserver's data port (kubegfs/chunkserver/dataport.py): a piece's PUT only, with the
main port's token check, cluster check and JSON answers; clients and chunkservers learn it from
the main port's answers and send later pieces (and forward them) there."""

import json
import os
import socket
from urllib.parse import urlsplit

import pytest
import requests

from kubegfs.httpconn import Connection

CHUNK = 256 * 1024  # tests/integration/conftest.py: the clusters' chunk size
LEAN = "/internal/chunks/{h} (data port)"  # the data port's route in the request metrics


def _data_url(cs, token):
    """A chunkserver's data port, as its answer to a piece names it."""
    h = {"Authorization": f"Bearer {token}"}
    r = requests.put(cs.url + "/internal/chunks/00000000000da7a0?version=1", data=b"p", headers=h, timeout=10)
    assert r.status_code == 200, r.text
    port = r.headers["X-Kubegfs-Data-Port"]
    return f"http://{urlsplit(cs.url).hostname}:{port}"


def _put(url, path, body, headers):
    u = urlsplit(url)
    conn = Connection(u.hostname, u.port, 10)
    try:
        conn.send("PUT", path, body, headers)
        return conn.response("PUT")
    finally:
        conn.close()


def _metric(cs, route, token):
    """How many PUTs ``cs`` answered 200 on ``route`` (its /metrics)."""
    text = requests.get(cs.url + "/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10).text
    n = 0.0
    for line in text.splitlines():
        if line.startswith("kubegfs_http_requests_total") and f'route="{route}"' in line and 'code="200"' in line \
                and 'method="PUT"' in line:
            n += float(line.rsplit(" ", 1)[1])
    return n


def test_a_put_sends_its_pieces_to_the_data_ports_it_learned(cluster):
    c = cluster.client()
    data = os.urandom(CHUNK * 3 + 777)
    c.put("/f", data)
    assert c.get("/f") == data
    assert c.data_ports  # learned from the first piece's answer
    c.put("/g", data)
    assert c.get("/g") == data
    assert sum(_metric(p, LEAN, cluster.token) for p in cluster.chunkservers) > 0
    for ch in c.layout("/g")["chunks"]:
        assert len(ch["replicas"]) == 3
        copies = {bytes(c._req("GET", f"{r['address']}/internal/chunks/{ch['handle']}",
                               params={"offset": 0, "length": CHUNK, "version": ch["version"]}))
                  for r in ch["replicas"]}
        assert len(copies) == 1


def _open_chunk(c, path):
    """A chunk placed for an open write (its lease held, so the master keeps it): its handle,
    version and replicas."""
    lease = c.api("POST", "/fs/open", json={"path": path, "mode": "create", "alloc": True})
    return lease["first"]


def test_a_chunkserver_forwards_to_the_data_port_it_learned(shared_cluster):
    """A piece forwarded once through the main ports names the next replicas' data ports; the
    next piece goes down the chain through the data ports only."""
    c = shared_cluster.client()
    tok = shared_cluster.token
    first = _open_chunk(c, "/forwarded")
    by_url = {p.url: p for p in shared_cluster.chunkservers}
    cs = [by_url[r["address"]] for r in first["replicas"]]
    h = {"Authorization": f"Bearer {tok}", "X-Kubegfs-Chain": f"{cs[1].url},{cs[2].url}"}
    target = f"/internal/chunks/{first['handle']}?version={first['version']}"
    r = requests.put(f"{cs[0].url}{target}&offset=0", data=b"one", headers=h, timeout=10)
    assert r.status_code == 200 and len(r.json()["acked"]) == 3, r.text
    url = _data_url(cs[0], tok)
    main = [_metric(p, "/internal/chunks/{h}", tok) for p in cs]
    lean = [_metric(p, LEAN, tok) for p in cs]
    r2 = _put(url, f"{target}&offset=3", b"two", h)
    assert r2.status == 200, bytes(r2.body)
    assert len(json.loads(bytes(r2.body))["acked"]) == 3
    assert [_metric(p, "/internal/chunks/{h}", tok) for p in cs] == main
    assert [_metric(p, LEAN, tok) - n for p, n in zip(cs, lean, strict=True)] == [1, 1, 1]
    for p in cs:
        assert bytes(c._req("GET", f"{p.url}{target}")) == b"onetwo"


def test_a_direct_piece_on_the_data_port_goes_down_the_chain(shared_cluster):
    c = shared_cluster.client()
    first = _open_chunk(c, "/direct")
    by_url = {p.url: p for p in shared_cluster.chunkservers}
    head, *rest = [by_url[r["address"]] for r in first["replicas"]]
    url = _data_url(head, shared_cluster.token)
    target = f"/internal/chunks/{first['handle']}?version={first['version']}&offset=0"
    r = _put(url, target, b"lean piece", {"Authorization": f"Bearer {shared_cluster.token}",
                                          "X-Kubegfs-Chain": ",".join(p.url for p in rest)})
    assert r.status == 200, bytes(r.body)
    assert r.headers["x-kubegfs-data-port"] == url.rsplit(":", 1)[1]
    body = json.loads(bytes(r.body))
    assert len(body["acked"]) == 3 and body["failed"] == {}
    for p in [head, *rest]:
        got = c._req("GET", f"{p.url}{target}")
        assert bytes(got) == b"lean piece"


@pytest.mark.parametrize("method,path,headers,status,error", [
    ("PUT", "/internal/chunks/00000000000da7a2?version=1", {}, 401, "unauthorized"),
    ("PUT", "/internal/chunks/00000000000da7a2?version=1", {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
    ("GET", "/internal/chunks/00000000000da7a2?version=1", "token", 404, "not_found"),
    ("PUT", "/internal/records/x", "token", 403, "forbidden"),
    ("PUT", "/internal/chunks/NOTHEX?version=1", "token", 400, "invalid_argument"),
    ("PUT", "/internal/chunks/00000000000da7a2", "token", 400, "invalid_argument"),  # no version
    ("PUT", "/internal/chunks/00000000000da7a2?version=1&offset=-1", "token", 400, "invalid_argument"),
    ("PUT", "/internal/chunks/00000000000da7a2?version=1", {"X-Kubegfs-Chain": "ftp://x"}, 400, "invalid_argument"),
    ("PUT", "/internal/chunks/00000000000da7a2?version=1", {"X-Kubegfs-Cluster": "another"}, 409, "cluster_mismatch"),
])
def test_bad_requests_on_the_data_port_are_4xx_json_and_store_nothing(shared_cluster, method, path, headers, status, error):
    cs = shared_cluster.chunkservers[0]
    url = _data_url(cs, shared_cluster.token)
    if headers == "token":
        headers = {"Authorization": f"Bearer {shared_cluster.token}"}
    elif "Authorization" not in headers and status != 401:
        headers = {**headers, "Authorization": f"Bearer {shared_cluster.token}"}
    u = urlsplit(url)
    conn = Connection(u.hostname, u.port, 10)
    try:
        conn.send(method, path, b"x", headers)
        r = conn.response(method)
    finally:
        conn.close()
    assert r.status == status, bytes(r.body)
    assert json.loads(bytes(r.body))["error"] == error
    assert not [p for p in cs.data.rglob("*") if "da7a2" in p.name]


def test_a_piece_larger_than_the_limit_is_413(shared_cluster):
    cs = shared_cluster.chunkservers[0]
    u = urlsplit(_data_url(cs, shared_cluster.token))
    s = socket.create_connection((u.hostname, u.port))
    with s:
        s.sendall((f"PUT /internal/chunks/00000000000da7a3?version=1 HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {shared_cluster.token}\r\nContent-Length: {9 << 20}\r\n\r\n").encode())
        got = s.recv(4096)
    assert got.startswith(b"HTTP/1.1 413 ")


def test_a_chunkserver_started_with_the_data_port_off_names_none(make_cluster):
    cluster = make_cluster()
    cs = cluster.chunkservers[0]
    cluster.kill(cs)
    cluster.chunkserver_args = ["--data-listen", "off"]
    cluster.start_chunkserver(cs)
    h = {"Authorization": f"Bearer {cluster.token}"}
    r = requests.put(cs.url + "/internal/chunks/00000000000da7a4?version=1", data=b"p", headers=h, timeout=10)
    assert r.status_code == 200, r.text
    assert "X-Kubegfs-Data-Port" not in r.headers
