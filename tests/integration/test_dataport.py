"""The chunkserver's data port (kubegfs/chunkserver/dataport.py): a piece's PUT and a
client-verified GET, with the main port's token check, cluster check and JSON answers; clients
and chunkservers learn it from the main port's answers and send later pieces (and forward them,
and read them) there."""

import json
import os
import socket
import zlib
from urllib.parse import urlsplit

import pytest
import requests

from kubegfs.formats import BLOCK_SIZE
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


def _call(method, url, path, body, headers):
    u = urlsplit(url)
    conn = Connection(u.hostname, u.port, 10)
    try:
        conn.send(method, path, body, headers)
        return conn.response(method)
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
    r2 = _call("PUT", url, f"{target}&offset=3", b"two", h)
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
    r = _call("PUT", url, target, b"lean piece", {"Authorization": f"Bearer {shared_cluster.token}",
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
    ("GET", "/internal/chunks/00000000000da7a2?version=1", "token", 400, "invalid_argument"),  # a body
    ("GET", "/metrics", "token", 404, "not_found"),  # served on the main port
    ("PUT", "/internal/records/x", "token", 403, "forbidden"),
    ("PUT", "/internal/chunks/NOTHEX?version=1", "token", 400, "invalid_argument"),
    ("PUT", "/internal/chunks/00000000000da7a2", "token", 400, "invalid_argument"),  # no version
    ("PUT", "/internal/chunks/00000000000da7a2?version=1&offset=-1", "token", 400, "invalid_argument"),
    ("PUT", "/internal/chunks/00000000000da7a2?version=1", {"X-Kubegfs-Chain": "ftp://x"}, 400, "invalid_argument"),
    ("PUT", "/internal/chunks/00000000000da7a2?version=1", {"X-Kubegfs-Cluster": "another"}, 409, "cluster_mismatch"),
    ("POST", "/internal/meta/stream?history=h", {}, 401, "unauthorized"),  # the op-log stream
    ("POST", "/internal/meta/stream?history=h", "token", 403, "forbidden"),  # the master's (internal) token only
    ("POST", "/internal/meta/stream?history=h", {"X-Kubegfs-Cluster": "another", "internal": 1}, 409,
     "cluster_mismatch"),
    ("POST", "/internal/meta/stream?history=h", {"internal": 1}, 400, "invalid_argument"),  # a body
    ("POST", "/internal/meta/stream", {"internal": 1}, 400, "invalid_argument"),  # no history
])
def test_bad_requests_on_the_data_port_are_4xx_json_and_store_nothing(shared_cluster, method, path, headers, status, error):
    cs = shared_cluster.chunkservers[0]
    url = _data_url(cs, shared_cluster.token)
    if headers == "token":
        headers = {"Authorization": f"Bearer {shared_cluster.token}"}
    elif headers.get("internal"):
        headers = {k: v for k, v in headers.items() if k != "internal"}
        headers["Authorization"] = f"Bearer {shared_cluster.internal_token}"
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


@pytest.fixture(scope="module")
def stored(shared_cluster):
    """A chunk of a file on every chunkserver: (its bytes, handle, version)."""
    c = shared_cluster.client()
    data = os.urandom(CHUNK - 1000)
    c.put("/read-port", data)
    ch = c.layout("/read-port")["chunks"][0]
    c.close()
    return data, ch["handle"], ch["version"]


def test_a_client_verified_get_is_whole_blocks_with_their_stored_crcs(shared_cluster, stored):
    data, h, v = stored
    cs = shared_cluster.chunkservers[0]
    main = requests.get(f"{cs.url}/internal/chunks/{h}?offset=0&length=1&version={v}",
                        headers={"Authorization": f"Bearer {shared_cluster.token}"}, timeout=10)
    assert main.status_code == 200
    url = f"http://{urlsplit(cs.url).hostname}:{main.headers['X-Kubegfs-Read-Port']}"
    r = _call("GET", url, f"/internal/chunks/{h}?offset=70000&length=5&version={v}", None,
              {"Authorization": f"Bearer {shared_cluster.token}", "X-Kubegfs-Verify": "client"})
    assert r.status == 200, bytes(r.body)
    assert int(r.headers["x-kubegfs-base"]) == BLOCK_SIZE and bytes(r.body) == data[BLOCK_SIZE : 2 * BLOCK_SIZE]
    assert r.headers["x-kubegfs-crcs"] == f"{zlib.crc32(data[BLOCK_SIZE : 2 * BLOCK_SIZE]):08x}"
    assert int(r.headers["x-kubegfs-chunk-length"]) == len(data)


@pytest.mark.parametrize("query,headers,status,error", [
    ("offset=0&length=10&version={v}", {"Authorization": None}, 401, "unauthorized"),
    ("offset=0&length=10&version={v}", {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
    ("offset=0&length=10&version={v}", {"Authorization": "metrics"}, 403, "forbidden"),
    ("offset=0&length=10&version={v}", {"X-Kubegfs-Verify": None}, 400, "invalid_argument"),  # curl: main port
    ("offset=0&length=10&version={v}", {"X-Kubegfs-Cluster": "another"}, 409, "cluster_mismatch"),
    ("offset=0&length=10&version={stale}", {}, 409, "conflict"),  # a stale replica is refused
    ("offset={past}&length=10&version={v}", {}, 400, "invalid_argument"),
    ("offset=-1&length=10&version={v}", {}, 400, "invalid_argument"),
    ("offset=0&length={big}&version={v}", {}, 400, "invalid_argument"),
    ("offset=0&length=ten&version={v}", {}, 400, "invalid_argument"),
])
def test_bad_gets_on_the_data_port_are_4xx_json(shared_cluster, stored, query, headers, status, error):
    data, h, v = stored
    cs = shared_cluster.chunkservers[0]
    url = _data_url(cs, shared_cluster.token)
    hdrs = {"Authorization": f"Bearer {shared_cluster.token}", "X-Kubegfs-Verify": "client", **headers}
    if hdrs["Authorization"] == "metrics":
        hdrs["Authorization"] = f"Bearer {shared_cluster.metrics_token}"
    hdrs = {k: val for k, val in hdrs.items() if val is not None}
    q = query.format(v=v, stale=v + 1, past=len(data) + 1, big=(8 << 20) + 1)
    r = _call("GET", url, f"/internal/chunks/{h}?{q}", None, hdrs)
    assert r.status == status, bytes(r.body)
    assert json.loads(bytes(r.body))["error"] == error


def test_a_get_of_a_missing_chunk_on_the_data_port_is_404_and_the_connection_goes_on(shared_cluster, stored):
    data, h, v = stored
    url = _data_url(shared_cluster.chunkservers[0], shared_cluster.token)
    u = urlsplit(url)
    conn = Connection(u.hostname, u.port, 10)
    hdrs = {"Authorization": f"Bearer {shared_cluster.token}", "X-Kubegfs-Verify": "client"}
    try:
        conn.send("GET", "/internal/chunks/00000000000da7a9?offset=0&length=10", None, hdrs)
        r = conn.response("GET")
        assert r.status == 404 and json.loads(bytes(r.body))["error"] == "not_found"
        conn.send("GET", f"/internal/chunks/{h}?offset=0&length=10&version={v}", None, hdrs)
        r = conn.response("GET")
        assert r.status == 200 and bytes(r.body) == data[:BLOCK_SIZE]
    finally:
        conn.close()
