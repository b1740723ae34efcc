"""Every endpoint checks the token; bad input gets a 4xx JSON answer and changes nothing."""

import pytest
import requests

from kubegfs_dev.util import stored_record

MASTER_ROUTES = [
    ("GET", "/metrics"), ("GET", "/api/v1/status"), ("GET", "/api/v1/chunkservers"),
    ("POST", "/api/v1/fs/mkdir"), ("GET", "/api/v1/fs/stat"), ("GET", "/api/v1/fs/ls"),
    ("POST", "/api/v1/fs/rm"), ("POST", "/api/v1/fs/mv"), ("POST", "/api/v1/fs/open"),
    ("POST", "/api/v1/fs/alloc"), ("POST", "/api/v1/fs/commit"), ("POST", "/api/v1/fs/abort"),
    ("GET", "/api/v1/fs/layout"), ("POST", "/api/v1/snapshots"), ("GET", "/api/v1/snapshots"),
    ("GET", "/api/v1/snapshots/x"), ("DELETE", "/api/v1/snapshots/x"),
    ("POST", "/api/v1/snapshots/x/restore"), ("GET", "/api/v1/snapshots/x/diff"), ("POST", "/api/v1/admin/checkpoint"),
    ("GET", "/api/v1/admin/dump"), ("POST", "/internal/heartbeat"),
]
CS_ROUTES = [
    ("GET", "/metrics"), ("PUT", "/internal/chunks/0000000000000001"),
    ("GET", "/internal/chunks/0000000000000001"), ("DELETE", "/internal/chunks/0000000000000001"),
    ("POST", "/internal/chunks/0000000000000001/clone"),
    ("POST", "/internal/chunks/0000000000000001/replicate"),
    ("POST", "/internal/chunks/0000000000000001/version"), ("GET", "/internal/records"),
    ("PUT", "/internal/records/abc"), ("GET", "/internal/records/abc"),
    ("DELETE", "/internal/records/abc"), ("GET", "/internal/info"),
]


@pytest.mark.parametrize("method,path", MASTER_ROUTES)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic abc", "Bearer "])
def test_master_rejects_missing_or_wrong_token(shared_cluster, method, path, auth):
    h = {"Authorization": auth} if auth else {}
    r = requests.request(method, shared_cluster.master_url + path, headers=h, timeout=5)
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized"


@pytest.mark.parametrize("method,path", CS_ROUTES)
def test_chunkserver_rejects_missing_or_wrong_token(shared_cluster, method, path):
    url = shared_cluster.chunkservers[0].url + path
    assert requests.request(method, url, timeout=5).status_code == 401
    r = requests.request(method, url, headers={"Authorization": "Bearer nope"}, timeout=5)
    assert r.status_code == 401 and "token" in r.json()["message"]


def call(url, method, token, **kw):
    return requests.request(method, url, headers={"Authorization": f"Bearer {token}"}, timeout=5, **kw)


def test_each_role_token_reaches_only_its_routes(shared_cluster, client):
    cl = shared_cluster
    m, cs = cl.master_url, cl.chunkservers[0].url
    assert len({cl.token, cl.internal_token, cl.metrics_token}) == 3  # local up makes one per role
    before = client.dump()
    # metrics: scraping only; it can neither read nor write data
    for url in (m, cs):
        assert call(url + "/metrics", "GET", cl.metrics_token).status_code == 200
    refused = [call(m + "/api/v1/status", "GET", cl.metrics_token),
               call(m + "/api/v1/fs/mkdir", "POST", cl.metrics_token, json={"path": "/by-metrics"}),
               call(m + "/api/v1/snapshots", "POST", cl.metrics_token, json={"path": "/", "name": "m"}),
               call(m + "/internal/heartbeat", "POST", cl.metrics_token, json={}),
               call(cs + "/internal/chunks/0000000000000abc?version=1", "PUT", cl.metrics_token, data=b"x"),
               call(cs + "/internal/chunks/0000000000000abc", "GET", cl.metrics_token),
               # client: the API and the chunk data path, never the master's and chunkservers' own traffic
               call(m + "/internal/heartbeat", "POST", cl.token, json={"id": "fake", "address": "http://x"}),
               call(cs + "/internal/chunks/0000000000000abc", "DELETE", cl.token),
               call(cs + "/internal/records/forged", "PUT", cl.token, data=b"x"),
               call(cs + "/internal/chunks/0000000000000abc/version", "POST", cl.token, json={"version": 9}),
               # ... nor the metadata copies the master keeps on chunkservers (chunkserver/metaapi.py)
               call(cs + "/internal/meta", "GET", cl.token),
               call(cs + "/internal/meta/log", "GET", cl.metrics_token),
               call(cs + "/internal/meta/reset", "POST", cl.token, json={}),
               call(cs + "/internal/meta/log", "POST", cl.token, data=b"x"),
               call(cs + "/internal/meta/checkpoints/1", "PUT", cl.token, data=b"x"),
               call(m + "/api/v1/admin/recover", "POST", cl.metrics_token, json={}),
               # internal: not the client API
               call(m + "/api/v1/fs/mkdir", "POST", cl.internal_token, json={"path": "/by-internal"}),
               call(m + "/api/v1/admin/recover", "POST", cl.internal_token, json={})]
    for r in refused:
        assert r.status_code == 403 and r.json()["error"] == "forbidden", (r.request.method, r.url, r.text)
        assert "token may not" in r.json()["message"]
    assert client.dump() == before
    # and each reaches what it is for
    assert call(m + "/api/v1/status", "GET", cl.token).status_code == 200
    assert call(cs + "/internal/chunks/00000000000fffff", "GET", cl.token).status_code == 404  # allowed, absent
    assert call(cs + "/internal/info", "GET", cl.internal_token).status_code == 200
    assert call(cs + "/internal/meta", "GET", cl.internal_token).status_code not in (401, 403)


def test_health_is_open(shared_cluster):
    assert requests.get(shared_cluster.master_url + "/healthz", timeout=5).status_code == 200
    assert requests.get(shared_cluster.chunkservers[0].url + "/healthz", timeout=5).status_code == 200


BAD_MASTER = [
    ("POST", "/api/v1/fs/mkdir", b"{not json", 400),
    ("POST", "/api/v1/fs/mkdir", b"[1,2]", 400),
    ("POST", "/api/v1/fs/mkdir", b'{"path": 5}', 400),
    ("POST", "/api/v1/fs/mkdir", b'{"path": "/a/../../etc"}', 400),
    ("POST", "/api/v1/fs/mkdir", b'{"path": "/a\\u0000b"}', 400),
    ("POST", "/api/v1/fs/mkdir", b'{"path": "/' + b"x" * 300 + b'"}', 400),
    ("POST", "/api/v1/fs/mkdir", b'{"path": "/ok", "parents": "yes"}', 400),
    ("POST", "/api/v1/fs/mkdir", b'{"path": "/ok", "mode": 99999999}', 400),
    ("GET", "/api/v1/fs/stat?path=/%2e%2e/etc", 400),
    ("GET", "/api/v1/fs/stat?path=relative", 400),
    ("GET", "/api/v1/fs/stat?path=/nope", 404),
    ("GET", "/api/v1/fs/ls?path=/&limit=abc", 400),
    ("POST", "/api/v1/fs/rm", b'{"path": "/"}', 400),
    ("POST", "/api/v1/fs/mv", b'{"src": "/a"}', 400),
    ("POST", "/api/v1/fs/open", b'{"path": "/x", "mode": "truncate"}', 400),
    ("POST", "/api/v1/fs/open", b'{"path": "/missing/dir/x"}', 404),
    ("POST", "/api/v1/fs/alloc", b'{"lease": "nope"}', 409),
    ("POST", "/api/v1/fs/commit", b'{"lease": "nope", "size": 0, "chunks": []}', 409),
    ("POST", "/api/v1/snapshots", b'{"path": "/", "name": "../evil"}', 400),
    ("POST", "/api/v1/snapshots", b'{"path": "/", "name": "ok", "id": "../../etc"}', 400),
    ("POST", "/api/v1/snapshots", b'{"path": "/", "name": "ok", "copies": "2"}', 400),
    ("POST", "/api/v1/snapshots", b'{"path": "/", "name": "ok", "targets": "cs1"}', 400),
    ("GET", "/api/v1/snapshots/does-not-exist", 404),
    ("POST", "/api/v1/snapshots/does-not-exist/restore", b"{}", 404),
    ("GET", "/api/v1/snapshots/does-not-exist/diff", 404),
    ("GET", "/api/v1/snapshots/does-not-exist/diff?to=", 400),
    ("POST", "/internal/heartbeat", b'{"id": "x", "address": "file:///etc", "full": true}', 400),
    ("POST", "/internal/heartbeat", b'{"id": "x", "address": "http://h", "full": true, "chunks": [["../../x", 1]]}', 400),
]


@pytest.mark.parametrize("case", BAD_MASTER, ids=lambda c: f"{c[0]} {c[1][:40]} {c[-1]}")
def test_master_bad_input_is_4xx_json_and_changes_nothing(shared_cluster, client, case):
    method, path, *body, status = case
    before = client.dump()
    tok = shared_cluster.internal_token if path.startswith("/internal/") else shared_cluster.token
    h = {"Authorization": f"Bearer {tok}", "Content-Type": "application/json"}
    r = requests.request(method, shared_cluster.master_url + path, data=body[0] if body else None,
                         headers=h, timeout=5)
    assert r.status_code == status, r.text
    j = r.json()
    assert j["error"] and j["message"]
    assert client.dump() == before


def test_master_huge_body_rejected(shared_cluster, client):
    before = client.dump()
    h = {"Authorization": f"Bearer {shared_cluster.token}"}
    r = requests.post(shared_cluster.master_url + "/api/v1/fs/mkdir", data=b"{" + b" " * (9 << 20) + b"}",
                      headers=h, timeout=30)
    assert r.status_code == 413
    assert client.dump() == before


BAD_CS = [
    ("PUT", "/internal/chunks/../../etc/passwd?version=1", 404),
    ("PUT", "/internal/chunks/..%2f..%2fetc?version=1", 400),
    ("PUT", "/internal/chunks/ZZZZ?version=1", 400),
    ("PUT", "/internal/chunks/0000000000000abc", 400),                  # no version
    ("PUT", "/internal/chunks/0000000000000abc?version=1&offset=-1", 400),
    ("PUT", "/internal/chunks/0000000000000abc?version=1&offset=5", 400),  # gap in a new chunk
    ("GET", "/internal/chunks/00000000000fffff", 404),
    ("GET", "/internal/chunks/0000000000000abc?length=999999999999", 400),
    ("POST", "/internal/chunks/0000000000000abc/clone", 400),
    ("PUT", "/internal/records/abc", 400),                                # no checksum header
    ("PUT", "/internal/records/..%2fescape", 400),
    ("GET", "/internal/records/missing", 404),
]


@pytest.mark.parametrize("method,path,status", BAD_CS)
def test_chunkserver_bad_input(shared_cluster, method, path, status):
    cs = shared_cluster.chunkservers[0]

    def files() -> list[str]:
        # meta/ holds the master's op-log copies, which the master ships in the background
        # whatever this request does
        return sorted(str(p.relative_to(cs.data)) for p in cs.data.rglob("*")
                      if p.relative_to(cs.data).parts[0] != "meta")

    before = files()
    h = {"Authorization": f"Bearer {shared_cluster.internal_token}"}
    r = requests.request(method, cs.url + path, data=b"x", headers=h, timeout=5)
    assert r.status_code == status, r.text
    assert r.json()["message"]
    assert files() == before


def test_record_with_wrong_checksum_is_refused(shared_cluster):
    cs = shared_cluster.chunkservers[0]
    h = {"Authorization": f"Bearer {shared_cluster.internal_token}", "X-Kubegfs-Sha256": "0" * 64}
    r = requests.put(cs.url + "/internal/records/forged", data=b"payload", headers=h, timeout=5)
    assert r.status_code == 502 and r.json()["error"] == "corrupt"
    assert stored_record(cs.data, "forged") is None
